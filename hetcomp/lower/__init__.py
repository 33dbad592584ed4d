"""Lowering: swap each layer assigned to a simulated target for that target's simulation module.

Partitioning only tags layers; lowering is this separate step (as in ExecuTorch). It works on a deep
copy, so the digital, annotated graph stays intact for Hessians and ONNX export. Which simulator a
target uses is data: ``target.lowering["simulator"]`` names an entry of ``SIMULATORS``. A target with no
simulator runs as the ideal digital layer, and the lowering report says so for that layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp.errors import ConfigError
from hetcomp.graph.layers import mappable_nodes
from hetcomp.lower import aihwkit_sim
from hetcomp.targets import TargetSet
from hetcomp.targets.base import Target


@dataclass(frozen=True)
class Simulator:
    """How to lower to, read back from, and re-program one kind of simulated hardware."""

    name: str
    lower_module: Callable[[nn.Module, Target], nn.Module]
    digital_weights: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]
    program_and_drift: Callable[[nn.Module, float], None]


SIMULATORS: dict[str, Simulator] = {
    "aihwkit": Simulator("aihwkit", aihwkit_sim.lower_module, aihwkit_sim.digital_weights,
                         aihwkit_sim.program_and_drift),
}


def simulator_of(target: Target) -> Simulator | None:
    name = target.lowering.get("simulator")
    if name is None:
        return None
    if name not in SIMULATORS:
        raise ConfigError(f"target {target.name!r} names simulator {name!r}; known: {sorted(SIMULATORS)}")
    return SIMULATORS[name]


def lower_graph(gm: fx.GraphModule, targets: TargetSet, layers: Iterable[str] | None = None
                ) -> tuple[fx.GraphModule, dict[str, dict[str, Any]]]:
    """A copy of ``gm`` with every assigned layer (or only those named in ``layers``) lowered.

    Returns (lowered graph, report: layer name -> {module, target, simulator}); simulator is None where
    the layer runs as the ideal digital layer (a digital target, or a target without a simulator).
    """
    only = None if layers is None else set(layers)
    plan = []
    for _, annotation in mappable_nodes(gm):
        layer = annotation.layer
        if only is not None and layer.name not in only:
            continue
        if annotation.assignment is None:
            raise ConfigError(f"layer {layer.name!r} has no assignment; run a partition pass before lowering")
        if isinstance(annotation.assignment, dict):
            raise ConfigError(f"layer {layer.name!r} is row-split {annotation.assignment}; row-split lowering "
                              "is not available in this version")
        target = targets[annotation.assignment]
        simulator = simulator_of(target)
        if simulator is not None and layer.module_name is None:
            raise ConfigError(f"layer {layer.name!r} is a functional {layer.op} on {target.name}; lowering needs "
                              "an nn.Linear/nn.Conv module: wrap the weight in a module or assign it digital")
        plan.append((layer, target, simulator))
    lowered = copy.deepcopy(gm)
    report = {}
    for layer, target, simulator in plan:
        if simulator is not None and layer.module_name is not None:
            lowered.set_submodule(layer.module_name, simulator.lower_module(lowered.get_submodule(layer.module_name),
                                                                           target))
        report[layer.name] = {"module": layer.module_name, "target": target.name,
                              "simulator": None if simulator is None else simulator.name,
                              "weight_shape": list(layer.weight_shape)}
    lowered.recompile()
    return lowered, report


def lowered_modules(report: dict[str, dict[str, Any]]) -> dict[str, Simulator]:
    """Module name -> simulator for every layer that was actually lowered."""
    return {entry["module"]: SIMULATORS[entry["simulator"]] for entry in report.values() if entry["simulator"]}


def digital_state_dict(lowered: nn.Module, report: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The state dict of the *digital* graph that computes what ``lowered`` was trained to (detached copies).

    Used for checkpoints (plain tensors: loadable with ``weights_only=True``) and to carry fine-tuned
    weights back into the digital graph for export.
    """
    modules = lowered_modules(report)
    shapes = {entry["module"]: entry["weight_shape"] for entry in report.values()}
    state = {key: value.detach().clone() for key, value in lowered.state_dict().items()
             if not any(key.startswith(name + ".") for name in modules)}
    for name, simulator in modules.items():
        weight, bias = simulator.digital_weights(lowered.get_submodule(name))
        state[f"{name}.weight"] = weight.detach().reshape(shapes[name]).clone()  # conv tiles hold [out, in*k*k]
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().clone()
    return state


def program_and_drift(lowered: nn.Module, report: dict[str, dict[str, Any]], t_inference: float) -> None:
    """Fresh programming noise and drift to ``t_inference`` seconds on every lowered layer."""
    for name, simulator in lowered_modules(report).items():
        simulator.program_and_drift(lowered.get_submodule(name), t_inference)
