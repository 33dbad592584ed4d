"""Lowering: swap each layer assigned to a simulated target for that target's simulation module.

Partitioning only tags layers; lowering is this separate step (as in ExecuTorch). It works on a deep
copy, so the digital, annotated graph stays intact for Hessians and ONNX export. Which simulator a
target uses is data: ``target.simulator`` names a registered ``Simulator`` (hetcomp.lower.simulator), which
owns that device's physics. A target with no simulator runs as the ideal digital layer, and the lowering
report says so for that layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp.errors import ConfigError
from hetcomp.graph.layers import DYNAMIC, mappable_nodes
from hetcomp.lower.row_split import RowSplit, input_channels, slice_rows
from hetcomp.lower.simulator import (
    SIMULATORS,
    Simulator,
    register_simulator,
    remember_simulator_module,
    simulator_module,
    simulator_named,
    simulator_of,
    target_definition,
    weight_noise_rel,
)
from hetcomp.targets.base import TargetSet

__all__ = [
    "SIMULATORS", "Simulator", "digital_state_dict", "lower_graph", "lowered_modules", "program_and_drift",
    "register_simulator", "remember_simulator_module", "row_split_trainable", "simulator_module", "simulator_named",
    "simulator_of", "target_definition", "weight_noise_rel",
]


class RowSplitSimulator(Simulator):
    """Not a target's simulator: the wrapper ``lower_graph`` builds for a layer whose rows span several tiers;
    each part is read back and re-programmed by its own tier's simulator."""

    name = "row-split"

    def digital_weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = bias = None
        for tier, part in module.parts.items():
            simulator = module.simulators[tier]
            w, b = simulator_named(simulator).digital_weights(part) if simulator else (part.weight, part.bias)
            index = module.rows(tier)
            if weight is None:
                weight = w.new_empty((module.out_rows, *w.shape[1:]))
                bias = None if b is None else b.new_empty(module.out_rows)
            weight[index] = w.detach()
            if bias is not None and b is not None:
                bias[index] = b.detach()
        return weight, bias

    def program_and_drift(self, module: nn.Module, t_inference: float) -> None:
        for tier, part in module.parts.items():
            if module.simulators[tier]:
                simulator_named(module.simulators[tier]).program_and_drift(part, t_inference)

    def repeats_unsupported(self, module: nn.Module) -> str | None:
        from hetcomp.lower.tier_repeats import row_split_unsupported

        return row_split_unsupported(module)

    def programs(self, module: nn.Module, t_inference: float, program_seeds: list[int]) -> list[torch.Tensor]:
        """The parts' programmed states, part after part (hetcomp.lower.tier_repeats.part_programs)."""
        from hetcomp.lower.tier_repeats import part_programs

        return [tensor for state in part_programs(module, t_inference, program_seeds).values() for tensor in state]

    def repeated(self, module: nn.Module, t_inference: float, program_seeds: list[int],
                 noise_seeds: list[int], programmed: list[torch.Tensor] | None = None) -> Any:
        """The parts' repeated forms put together (hetcomp.lower.tier_repeats.RepeatedRowSplit)."""
        from hetcomp.lower.tier_repeats import RepeatedRowSplit

        return RepeatedRowSplit(module, t_inference, program_seeds, noise_seeds, programmed)


ROW_SPLIT = RowSplitSimulator()


def row_split_trainable(assignment: dict[str, int], targets: TargetSet) -> bool:
    """Whether fine-tuning can train a layer row-split over ``assignment``: every tier that holds rows runs it
    digitally or through a ``trainable`` simulator that trains with the base class's plain SGD (the parts train
    together under ``RowSplitSimulator``, whose optimizer that is; aihwkit's tiles need AnalogSGD)."""
    for tier, rows in assignment.items():
        simulator = simulator_of(targets[tier]) if rows else None
        if simulator is not None and (not simulator.trainable or type(simulator).optimizer is not Simulator.optimizer):
            return False
    return True


def lower_graph(gm: fx.GraphModule, targets: TargetSet, layers: Iterable[str] | None = None
                ) -> tuple[fx.GraphModule, dict[str, dict[str, Any]]]:
    """A copy of ``gm`` with every assigned layer (or only those named in ``layers``) lowered.

    A layer that is an ``nn.Module`` is swapped by its qualified name; a functional layer (a dynamic matmul,
    or ``F.linear``/``aten.linear`` on a parameter, as the torch.export front end yields) is replaced at its
    graph node by a call to an inserted module ``hetcomp_lowered_<layer name>``. A row-split layer becomes a
    ``RowSplit`` with one part per tier. Returns (lowered graph, report: layer name -> {module, target,
    simulator, weight_shape}); simulator is None where the layer runs as the ideal digital layer.
    """
    with torch.random.fork_rng(devices=[]):  # new modules initialise from the CPU RNG: not the caller's
        return _lower_graph(gm, targets, layers)


def _lower_graph(gm: fx.GraphModule, targets: TargetSet, layers: Iterable[str] | None
                 ) -> tuple[fx.GraphModule, dict[str, dict[str, Any]]]:
    only = None if layers is None else set(layers)
    plan = []
    for _, annotation in mappable_nodes(gm):
        layer = annotation.layer
        if only is not None and layer.name not in only:
            continue
        if annotation.assignment is None:
            raise ConfigError(f"layer {layer.name!r} has no assignment; run a partition pass before lowering")
        plan.append((layer, annotation.assignment, annotation.row_targets))
    lowered = copy.deepcopy(gm)
    nodes = {node.name: node for node in lowered.graph.nodes}
    calls: dict[str, int] = {}
    for _, annotation in mappable_nodes(gm):
        if annotation.layer.module_name is not None:
            calls[annotation.layer.module_name] = calls.get(annotation.layer.module_name, 0) + 1
    report = {}
    for layer, assignment, row_targets in plan:
        if isinstance(assignment, dict):
            module, simulator = _row_split(lowered, layer, targets, assignment, row_targets), "row-split"
        else:
            sim = simulator_of(targets[assignment])
            simulator = None if sim is None else sim.name
            module = None if sim is None else sim.lower(_source_module(lowered, layer), targets[assignment])
        name = layer.module_name
        if module is not None:
            module = _on_graph_device(module, lowered)
            if name is not None and calls.get(name, 0) == 1:
                lowered.set_submodule(name, module)
            else:  # a functional layer, or one call of a module called several times: lowered at its node
                name = _replace_node(lowered, nodes[layer.node_name], layer, module)
        report[layer.name] = {"module": name, "target": assignment, "simulator": simulator,
                              "weight_shape": list(layer.weight_shape), "kind": layer.kind}
        if module is not None and name.startswith(INSERTED) and layer.weight_param is not None:
            # where its weights live in the digital graph, to carry fine-tuned weights back (digital_state_dict)
            bias = layer.extra.get("bias_param")
            if bias is None and layer.module_name is not None and \
                    getattr(gm.get_submodule(layer.module_name), "bias", None) is not None:
                bias = f"{layer.module_name}.bias"  # one call of a module called several times
            report[layer.name].update(weight_param=layer.weight_param, bias_param=bias,
                                      transposed=layer.op == "matmul")
    lowered.graph.eliminate_dead_code()
    lowered.recompile()
    # New simulation modules start in training mode (aihwkit would then add training noise on every forward):
    # the lowered model is in the digital graph's mode, eval after compile.
    for module in lowered.modules():  # not .train(): a torch.export graph refuses it
        module.training = gm.training
    return lowered, report


def _on_graph_device(module: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """``module`` moved to the graph's device if it holds a parameter elsewhere (a dynamic product's LSQ steps
    are made without a weight to take the device from); a module already there is left untouched."""
    reference = next(gm.parameters(), None)
    if reference is not None and any(p.device != reference.device for p in module.parameters()):
        module = module.to(reference.device)
    return module


def _source_module(gm: fx.GraphModule, layer) -> nn.Module | None:
    """The layer as a module to lower: its own module, a Linear around a functional weight, or None (dynamic)."""
    if layer.module_name is not None:
        return gm.get_submodule(layer.module_name)
    if layer.kind == DYNAMIC:
        return None
    weight = gm.get_parameter(layer.weight_param)
    if layer.op == "matmul":  # x @ W with W [in, out]
        weight = weight.t()
    bias_name = layer.extra.get("bias_param")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias_name is not None).to(weight.device, weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias_name is not None:
            linear.bias.copy_(gm.get_parameter(bias_name))
    return linear


def _row_split(gm: fx.GraphModule, layer, targets: TargetSet, assignment: dict[str, int],
               row_targets: list[str] | None) -> RowSplit:
    if row_targets is None or len(row_targets) != layer.rows:
        raise ConfigError(f"layer {layer.name!r} is row-split {assignment} but has no per-row targets "
                          "(row_targets); a partition pass must set both")
    indices = {tier: [r for r, t in enumerate(row_targets) if t == tier] for tier in assignment}
    if {tier: len(index) for tier, index in indices.items() if index} != {t: n for t, n in assignment.items() if n} \
            or sum(map(len, indices.values())) != layer.rows:
        raise ConfigError(f"layer {layer.name!r}: its per-row targets (row_targets) do not match its assignment "
                          f"{assignment}")
    source = _source_module(gm, layer)
    inputs = None
    if getattr(source, "groups", 1) > 1:  # each tier must hold whole groups: checked before lowering any part
        try:
            inputs = {tier: input_channels(source, index) for tier, index in indices.items()}
        except ConfigError as error:
            raise ConfigError(f"layer {layer.name!r} (assignment {assignment}): {error}") from None
    parts, simulators = {}, {}
    for tier, index in indices.items():
        sim = simulator_of(targets[tier])
        if source is None:  # a dynamic product: the part computes a @ b[..., rows]
            part = sim.lower(None, targets[tier]) if sim else _MatMul()
        else:
            sliced = slice_rows(source, index)
            part = sim.lower(sliced, targets[tier]) if sim else sliced
        parts[tier], simulators[tier] = part, None if sim is None else sim.name
    dim = 1 if layer.op.startswith("conv") else -1
    device = next(gm.parameters()).device  # the index buffers live with the model
    return RowSplit(parts, indices, simulators, layer.rows, dim, device, inputs)


class _MatMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


INSERTED = "hetcomp_lowered_"  # prefix of the modules lowering inserts for layers lowered at their graph node


def _replace_node(gm: fx.GraphModule, node: fx.Node, layer, module: nn.Module) -> str:
    name = INSERTED + "".join(c if c.isalnum() else "_" for c in layer.name)
    gm.add_submodule(name, module)
    args = (node.args[0],) if layer.kind != DYNAMIC else (node.args[0], node.args[1])
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, args)
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return name


def lowered_modules(report: dict[str, dict[str, Any]]) -> dict[str, Simulator]:
    """Module name -> simulator for every layer that was actually lowered."""
    return {entry["module"]: ROW_SPLIT if entry["simulator"] == ROW_SPLIT.name else simulator_named(entry["simulator"])
            for entry in report.values() if entry["simulator"]}


def digital_state_dict(lowered: nn.Module, report: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The state dict of the *digital* graph that computes what ``lowered`` was trained to (detached copies).

    Used for checkpoints (plain tensors: loadable with ``weights_only=True``) and to carry fine-tuned
    weights back into the digital graph for export. A layer swapped by its module name goes back under that
    name; a layer lowered at its graph node (an inserted ``hetcomp_lowered_*`` module: ``aten.linear`` of the
    torch.export front end, ``F.linear``, one call of a module called several times) goes back to the weight and
    bias parameters its node read (transposed back for ``x @ W``), and the inserted module's own state is left out.
    """
    lowered_by_name = lowered_modules(report)
    modules = {name: simulator for name, simulator in lowered_by_name.items() if not name.startswith(INSERTED)}
    inserted = {entry["module"]: entry for entry in report.values()
                if entry["simulator"] and entry["module"].startswith(INSERTED)}
    shapes = {entry["module"]: entry["weight_shape"] for entry in report.values()}
    state = {key: value.detach().clone() for key, value in lowered.state_dict().items()
             if not any(key.startswith(name + ".") for name in (*modules, *inserted))}
    for name, simulator in modules.items():
        weight, bias = simulator.digital_weights(lowered.get_submodule(name))
        state[f"{name}.weight"] = weight.detach().reshape(shapes[name]).clone()  # conv tiles hold [out, in*k*k]
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().clone()
    for name, entry in inserted.items():
        if entry.get("weight_param") is None:  # a dynamic product: no weights
            continue
        weight, bias = lowered_by_name[name].digital_weights(lowered.get_submodule(name))
        weight = weight.detach().t() if entry.get("transposed") else weight.detach()
        state[entry["weight_param"]] = weight.reshape(state[entry["weight_param"]].shape).clone()
        if bias is not None and entry.get("bias_param") is not None:
            state[entry["bias_param"]] = bias.detach().reshape(state[entry["bias_param"]].shape).clone()
    return state


def program_and_drift(lowered: nn.Module, report: dict[str, dict[str, Any]], t_inference: float) -> None:
    """Fresh programming noise and drift to ``t_inference`` seconds on every lowered layer."""
    for name, simulator in lowered_modules(report).items():
        simulator.program_and_drift(lowered.get_submodule(name), t_inference)
