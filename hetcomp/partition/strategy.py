"""Strategies as an abstraction: a named partition pipeline that turns a target set into partition passes.

``build(targets, finetune)`` returns the partition passes; ``finetune`` is the fine-tuning pass given to
compile (or None). A strategy with ``trains=True`` retrains inside its own search (using those settings), so
compile does not run the fine-tuning pass after it. The built-in strategies are defined in
``hetcomp.strategies`` and registered by ``hetcomp.builtins``; ``register_strategy`` adds a user's own, and a
family (e.g. ``all-<target>``) makes a strategy from a name's suffix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hetcomp import checks
from hetcomp.errors import ConfigError
from hetcomp.registry import Registry, load_builtins
from hetcomp.targets.base import TargetSet


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    build: Callable[[TargetSet, Any], list[Any]]
    needs_data: bool = False  # needs calibration data (Hessian metrics, or training)
    trains: bool = False  # its search retrains the model (the fine-tuning pass is not run after it)


STRATEGIES: Registry[Strategy] = Registry("strategy", ConfigError, "add your own with register_strategy",
                                          check=lambda entry: isinstance(entry, Strategy))
# Name prefix -> factory(suffix, targets) -> Strategy or None (e.g. "all-" + a target of the set).
FAMILIES: dict[str, Callable[[str, TargetSet], Strategy | None]] = {}


def register_strategy(strategy: Strategy, *, overwrite: bool = False) -> Strategy:
    """Add a strategy so ``strategy=`` can name it. A name already registered is refused unless
    ``overwrite=True`` (as ``hetcomp.targets.register`` refuses a target's)."""
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"register_strategy() takes a hetcomp.strategies.Strategy, got {checks.got(strategy)}")
    return STRATEGIES.register(strategy.name, strategy, overwrite=overwrite)


def register_family(prefix: str, factory: Callable[[str, TargetSet], Strategy | None]) -> None:
    """Strategies named ``prefix`` + something, made on demand by ``factory(something, targets)``."""
    FAMILIES[prefix] = factory


def available_strategies() -> list[str]:
    load_builtins()
    return STRATEGIES.names() + [f"{prefix}<target>" for prefix in sorted(FAMILIES)]


def resolve(name: str | Strategy | None, targets: TargetSet) -> Strategy:
    """The strategy for ``name`` (None: the target set's default). Errors name the known strategies. The
    strategy's passes are built once here, so a target set it cannot serve fails before any work."""
    if name is not None and not isinstance(name, str | Strategy):
        raise ConfigError(f"strategy must be a name such as 'hilal' (known: {', '.join(available_strategies())}), "
                          f"a hetcomp.strategies.Strategy such as hetcomp.strategies.pareto(...), or None for the "
                          f"target set's default; got {checks.got(name)}")
    if isinstance(name, Strategy):
        name.build(targets, None)
        return name
    if name is None:
        name = default_strategy(targets)
    if name in STRATEGIES:
        strategy = STRATEGIES.get(name)
        strategy.build(targets, None)
        return strategy
    for prefix, factory in FAMILIES.items():
        if name.startswith(prefix):
            made = factory(name[len(prefix):], targets)
            if made is not None:
                return made
    raise ConfigError(
        f"unknown strategy {name!r} for target set {targets}; known: {', '.join(available_strategies())}"
    )


def default_strategy(targets: TargetSet) -> str:
    """One target: ``all-<it>``. One analog target + digital: ``hilal`` (needs data=). Several analog
    tiers (e.g. sram+reram+photonic): ``pareto`` (H3PIMAP; needs data= for its row remap; without data
    name ``pareto-po``)."""
    if len(targets.targets) == 1:
        return f"all-{targets.names[0]}"
    if len(targets.analog) == 1 and targets.digital:
        return "hilal"
    return "pareto"
