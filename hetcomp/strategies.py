"""Strategies: named partition pipelines. A strategy turns a target set into partition passes.

Built in: ``all-digital``, ``all-analog`` (the set's one analog target), ``all-<target>`` for any
target in the set, ``first-last-digital``. ``default_strategy`` documents what ``strategy=None`` picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hetcomp.errors import ConfigError
from hetcomp.passes.assign import most_accurate_digital, sole_analog
from hetcomp.passes.assign_all import AssignAll
from hetcomp.passes.base import Pass
from hetcomp.passes.first_last_digital import FirstLastDigital
from hetcomp.targets import TargetSet


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    build: Callable[[TargetSet], list[Pass]]
    needs_data: bool = False  # needs calibration data (Hessian metrics)


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    _STRATEGIES[strategy.name] = strategy
    return strategy


register_strategy(Strategy(
    "all-digital", "every layer on the most accurate digital target",
    lambda ts: [AssignAll(most_accurate_digital(ts, "all-digital"))],
))
register_strategy(Strategy(
    "all-analog", "every layer on the set's analog target (ops it cannot run fall back, with a reason)",
    lambda ts: [AssignAll(sole_analog(ts, "all-analog"))],
))
register_strategy(Strategy(
    "first-last-digital", "first and last mappable layer digital, the rest analog (DIANA-style)",
    lambda ts: [FirstLastDigital(most_accurate_digital(ts, "first-last-digital"),
                                 sole_analog(ts, "first-last-digital"))],
))


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES) + ["all-<target>"]


def resolve(name: str | None, targets: TargetSet) -> Strategy:
    """The strategy for ``name`` (None: the target set's default). Errors name the known strategies."""
    if name is None:
        name = default_strategy(targets)
    if name in _STRATEGIES:
        strategy = _STRATEGIES[name]
        strategy.build(targets)  # raises now, before any work, if the target set does not fit
        return strategy
    if name.startswith("all-") and name[4:] in targets:
        target = name[4:]
        return Strategy(name, f"every layer on {target}", lambda ts: [AssignAll(target)])
    raise ConfigError(
        f"unknown strategy {name!r} for target set {targets}; known: {', '.join(available_strategies())}"
    )


def default_strategy(targets: TargetSet) -> str:
    """One target: ``all-<it>``. One analog target + digital: ``first-last-digital``.
    Otherwise (several analog targets) a strategy must be named."""
    if len(targets.targets) == 1:
        return f"all-{targets.names[0]}"
    if len(targets.analog) == 1 and targets.digital:
        return "first-last-digital"
    raise ConfigError(
        f"no default strategy for target set {targets} yet; pass strategy= one of "
        f"{', '.join(available_strategies())}"
    )
