"""A target's physics: the ``Simulator`` base class and the simulator registry.

A simulator is one device family's behaviour, in one place: which parameters a target gives it
(``required`` / ``defaults``, checked), the effective Gaussian weight noise the Hessian passes turn into
expected loss (``weight_noise_rel``), how a layer is lowered to a simulation module, how that module's
digital weights are read back, and how it is re-programmed and drifted for a hardware repeat. Built-in ones
(aihwkit PCM, PIM crossbar, photonic) are registered by ``hetcomp.builtins``; a new device is one file in user
code: subclass ``Simulator``, ``register_simulator(MySimulator())``, and name it in a target's ``simulator``
(modelled on aihwkit's ``BaseNoiseModel`` with one subclass per device).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from hetcomp.errors import ConfigError
from hetcomp.graph.layers import WEIGHT_STATIC
from hetcomp.registry import Registry
from hetcomp.targets.base import Target, TargetSet


class Simulator:
    """Subclass and set ``name``; override what the device does differently. ``trainable``: gradients reach
    the weights through the simulation (LAFT can fine-tune through it)."""

    name: str = ""
    trainable: bool = False
    required: tuple[str, ...] = ()  # device parameters a target must give
    defaults: dict[str, Any] = {}  # device parameters with defaults; any other key is refused

    def settings(self, target: Target) -> dict[str, Any]:
        """The target's device parameters over ``defaults``; a missing required or unknown key is a ConfigError."""
        missing = [key for key in self.required if key not in target.device]
        if missing:
            raise ConfigError(f"target {target.name!r}: simulator {self.name!r} needs device parameter(s) {missing}")
        unknown = sorted(set(target.device) - set(self.required) - set(self.defaults))
        if unknown:
            known = sorted({*self.required, *self.defaults})
            raise ConfigError(f"target {target.name!r}: unknown device parameter(s) {unknown} for simulator "
                              f"{self.name!r}; known: {known}")
        return {**self.defaults, **target.device}

    def check(self, target: Target) -> None:
        """Raise ConfigError now (before any work) if ``target`` cannot be simulated."""
        self.settings(target)

    def weight_noise_rel(self, target: Target) -> float:
        """Std of the effective Gaussian weight noise relative to max|W| (0: none): what the Hessian passes use
        for sigma (HILAL's gamma, H3PIMAP Eq. 4)."""
        return 0.0

    def lower(self, module: nn.Module | None, target: Target) -> nn.Module:
        """The simulation of ``module`` (a Linear/Conv, or None for a dynamic product a @ b) on ``target``."""
        raise NotImplementedError(f"simulator {self.name!r} does not lower layers")

    def digital_weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the digital layer the simulation module computes, in the original layer's shape."""
        return module.weight, getattr(module, "bias", None)

    def program_and_drift(self, module: nn.Module, t_inference: float) -> None:
        """Fresh programming (and drift to ``t_inference`` seconds) for a new hardware repeat; nothing by
        default (a device whose noise is drawn on every read)."""

    def repeats_unsupported(self, module: nn.Module) -> str | None:
        """Why ``module`` has no repeat-vectorized forward (None: ``repeated`` gives one); evaluation then runs one
        hardware repeat at a time."""
        return f"simulator {self.name!r} has no repeat-vectorized forward"

    def programs(self, module: nn.Module, t_inference: float, program_seeds: list[int]) -> list[torch.Tensor]:
        """The programmed state of ``module`` in the repeats ``program_seeds`` seed, as tensors whose leading
        dimension is the repeat (``len(program_seeds)`` rows): the costly, per-repeat part of ``repeated``, which
        takes it back as ``programmed=``. Repeat r's rows depend on ``program_seeds[r]`` alone, so ranks that share
        a group of repeats each draw a part and exchange them (hetcomp.evaluate). For every seed list, also an
        empty one, the same tensors (count, trailing shapes, dtypes) with that many rows: a rank whose part is
        empty receives the others' parts into tensors shaped like its own. Default: nothing (a device whose noise
        is drawn on every read)."""
        return []

    def repeated(self, module: nn.Module, t_inference: float, program_seeds: list[int],
                 noise_seeds: list[int], programmed: list[torch.Tensor] | None = None) -> Any:
        """A module computing ``module`` for len(program_seeds) independent hardware repeats at once: called as
        ``(x, folded=...)`` with ``x`` shared ([B, ...]) or repeat-major folded ([R*B, ...]), it returns the folded
        output; ``.select(indices)`` keeps some repeats, ``.noise = False`` turns forward noise off; ``.peak_bytes``
        (optional) is its working set, for sizing groups of repeats; ``.at_chunk(index)`` (optional) restarts every
        repeat's forward noise for data chunk ``index`` from ``hetcomp.lower.repeats.chunk_seed(noise seed, index)``,
        so that a chunk's draws do not depend on the chunks before it (without it, a multi-rank evaluation's noise
        differs from one process's). Repeat r is programmed and drifted from
        ``program_seeds[r]`` (a device without programming state, whose noise is drawn per read, ignores them) and
        draws its forward noise from ``noise_seeds[r]``, with any per-call statistic (a max-abs scale) taken over
        its own samples only, so its result does not depend on the other repeats; ``module`` itself is not
        changed. ``programmed``: ``programs(module, t_inference, program_seeds)``'s tensors, drawn already (None:
        drawn here)."""
        raise NotImplementedError(f"simulator {self.name!r} has no repeat-vectorized forward")

    def optimizer(self, groups: list[dict[str, Any]], lr: float, momentum: float) -> torch.optim.Optimizer:
        """The optimizer fine-tuning uses when layers on this device train (``trainable``): plain SGD by default;
        a device whose layers need their own update rule (aihwkit's tiles) returns its own."""
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def build_repeated(simulator: Simulator, module: nn.Module, t_inference: float, program_seeds: list[int],
                   noise_seeds: list[int], programmed: list[torch.Tensor] | None = None) -> Any:
    """``simulator.repeated(...)``, handed ``programmed`` only when there is a state: a simulator that programs
    nothing need not take the argument (``repeated``'s signature before ``programs`` existed)."""
    given = {"programmed": programmed} if programmed else {}
    return simulator.repeated(module, t_inference, program_seeds, noise_seeds, **given)


SIMULATORS: Registry[Simulator] = Registry(
    "simulator", ConfigError, "subclass hetcomp.lower.Simulator and register it with hetcomp.lower.register_simulator",
    check=lambda entry: isinstance(entry, Simulator))


def register_simulator(simulator: Simulator, *, overwrite: bool = False) -> Simulator:
    """Make ``simulator`` available to targets whose ``simulator`` names it. A manifest records the module that
    defines it, so a process that loads the manifest can say what to import."""
    if not isinstance(simulator, Simulator):
        raise ConfigError(f"register_simulator() takes a hetcomp.lower.Simulator, got {type(simulator).__name__}")
    return SIMULATORS.register(simulator.name, simulator, overwrite=overwrite)


def simulator_named(name: str) -> Simulator:
    return SIMULATORS.get(name)


# Target name -> module that defines its simulator, as recorded in a manifest that was loaded.
_MODULE_HINTS: dict[str, str] = {}


def simulator_of(target: Target) -> Simulator | None:
    """The target's simulator (None: it runs as the exact digital layer)."""
    if target.simulator is None:
        return None
    if target.simulator not in SIMULATORS:
        origin = _MODULE_HINTS.get(target.name)
        hint = f"import {origin} (it registers it) first" if origin else "register it with register_simulator"
        raise ConfigError(f"target {target.name!r} uses simulator {target.simulator!r}, which is not registered in "
                          f"this process; {hint} (known: {', '.join(SIMULATORS.names())})")
    return SIMULATORS.get(target.simulator)


def simulator_module(simulator: Simulator) -> str:
    """The module that defines ``simulator`` (what a fresh process must import to have it)."""
    return type(simulator).__module__


def target_definition(target: Target) -> dict[str, Any]:
    """A target's whole definition for a manifest, plus the module of a user simulator (None: built in or none)."""
    definition = target.to_dict()
    name = target.simulator
    module = simulator_module(SIMULATORS.get(name)) if name is not None and name in SIMULATORS else \
        _MODULE_HINTS.get(target.name)
    definition["simulator_module"] = None if module is None or module.startswith("hetcomp.") else module
    return definition


def remember_simulator_module(target_name: str, module: str | None) -> None:
    """Note where a loaded manifest says ``target_name``'s simulator comes from (for error messages)."""
    if module:
        _MODULE_HINTS[target_name] = module


def weight_noise_rel(target: Target) -> float:
    """The target's effective relative weight noise (0 for a target without a simulator)."""
    simulator = simulator_of(target)
    return 0.0 if simulator is None else float(simulator.weight_noise_rel(target))


# HILAL's gamma: used where no analog target of the set has weight noise to take sigma from.
DEFAULT_WEIGHT_NOISE = 0.08


def noisiest_analog(targets: TargetSet) -> tuple[Target | None, float]:
    """The analog target that stores weights with the most weight noise (as its simulator states it), and
    that noise; (None, 0) when the set has no such target."""
    analog = [t for t in targets.analog if t.supports_kind(WEIGHT_STATIC)]
    noise = {t.name: weight_noise_rel(t) for t in analog}
    source = max(analog, key=lambda t: noise[t.name], default=None)
    return source, 0.0 if source is None else noise[source.name]


def hessian_noise(targets: TargetSet) -> tuple[float, Target | None]:
    """(relative weight noise, its target) for HNI: the noisiest analog target's; HILAL's 0.08 (and None)
    when no analog target has weight noise."""
    source, noise = noisiest_analog(targets)
    return (noise, source) if noise > 0 else (DEFAULT_WEIGHT_NOISE, None)
