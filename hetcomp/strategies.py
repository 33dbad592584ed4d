"""Strategies: named partition pipelines. A strategy turns a target set into partition passes.

Built in: ``pareto`` (H3PIMAP: NSGA-II over rows per tier, then accuracy-driven row remap; the default for
several analog tiers; ``pareto(...)`` for settings, ``pareto-po`` for the search alone), ``equal-split``,
``hilal`` (k-means on [HNI, SCR]; the default for one analog target + digital), its
ablations ``hni-only`` and ``scr-only``, ``mac-greedy`` (LionHeart; ``mac_greedy(threshold=...)`` for
other settings), ``all-digital``, ``all-analog`` (the set's one analog target), ``all-<target>`` for any
target in the set, ``first-last-digital`` (DIANA-style). ``default_strategy`` documents what
``strategy=None`` picks.

``build(targets, finetune)`` returns the partition passes; ``finetune`` is the LAFT settings given to
compile (or None). A strategy with ``trains=True`` retrains inside its own search (using those
settings), so compile does not run LAFT after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hetcomp import checks
from hetcomp.errors import ConfigError
from hetcomp.passes.assign import most_accurate_digital, sole_analog
from hetcomp.passes.assign_all import AssignAll
from hetcomp.passes.base import Pass
from hetcomp.passes.equal_split import EqualSplit
from hetcomp.passes.first_last_digital import FirstLastDigital
from hetcomp.passes.kmeans_split import KMeansSplit
from hetcomp.passes.mac_greedy import MacGreedy
from hetcomp.passes.pareto_search import ParetoSearch
from hetcomp.passes.row_remap import RowRemap
from hetcomp.targets import TargetSet


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    build: Callable[[TargetSet, Any], list[Pass]]
    needs_data: bool = False  # needs calibration data (Hessian metrics, or training)
    trains: bool = False  # its search retrains the model (LAFT is not run after it)


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    _STRATEGIES[strategy.name] = strategy
    return strategy


register_strategy(Strategy(
    "all-digital", "every layer on the most accurate digital target",
    lambda ts, _: [AssignAll(most_accurate_digital(ts, "all-digital"))],
))
register_strategy(Strategy(
    "all-analog", "every layer on the set's analog target (ops it cannot run fall back, with a reason)",
    lambda ts, _: [AssignAll(sole_analog(ts, "all-analog"))],
))
register_strategy(Strategy(
    "first-last-digital", "first and last mappable layer digital, the rest analog (DIANA-style)",
    lambda ts, _: [FirstLastDigital(most_accurate_digital(ts, "first-last-digital"),
                                    sole_analog(ts, "first-last-digital"))],
))


def _kmeans(name: str, features: tuple[str, ...], description: str) -> Strategy:
    return Strategy(
        name, description,
        lambda ts, _: [KMeansSplit(most_accurate_digital(ts, name), sole_analog(ts, name), features=features,
                                   name=name)],
        needs_data=True,
    )


register_strategy(_kmeans("hilal", ("hni", "scr"),
                          "HILAL: k-means (k=2) on z-scored [HNI, SCR]; sensitive cluster digital, robust analog"))
register_strategy(_kmeans("hni-only", ("hni",), "k-means on HNI alone (HILAL ablation)"))
register_strategy(_kmeans("scr-only", ("scr",), "k-means on SCR alone (HILAL ablation)"))


def mac_greedy(threshold: float = 0.02, eval_repeats: int = 5, t_inference: float = 86400.0) -> Strategy:
    """LionHeart's greedy search with explicit settings (``strategy=mac_greedy(threshold=0.01)``); the
    settings are checked now, before any work."""
    threshold, eval_repeats, t_inference = MacGreedy.check_settings(threshold, eval_repeats, t_inference)
    return Strategy(
        "mac-greedy",
        f"LionHeart: layers by MACs, largest first, each kept analog only if retrained accuracy >= digital "
        f"- {threshold}",
        lambda ts, finetune: [MacGreedy(most_accurate_digital(ts, "mac-greedy"), sole_analog(ts, "mac-greedy"),
                                        threshold=threshold, training=finetune, eval_repeats=eval_repeats,
                                        t_inference=t_inference)],
        needs_data=True, trains=True,
    )


register_strategy(mac_greedy())


def pareto(population: int = 64, generations: int = 100, samples: float = 1.0, tolerance: float = 0.01,
           step: float = 0.02, candidates: int = 5, repeats: int = 3, max_steps: int = 60,
           remap: bool = True, choose: str = "knee", val_data: Any = None, quality: Any = None,
           higher_is_better: bool = True, checkpoint: Any = None) -> Strategy:
    """H3PIMAP with explicit settings: NSGA-II (stage 1) then, with ``remap``, accuracy-driven row remap
    measured on ``val_data`` (default: the data given to compile; pass held-out data). ``quality``,
    ``higher_is_better``, ``checkpoint``: see hetcomp.passes.row_remap.RowRemap."""
    search = ParetoSearch(population, generations, samples, choose)  # validates now, before any work
    checks.boolean("remap", remap)
    stages: list[Pass] = [search]
    if remap:
        stages.append(RowRemap(tolerance, step, candidates, repeats, max_steps, samples, val_data, quality,
                               higher_is_better, checkpoint))
    name = "pareto" if remap else "pareto-po"

    def build(targets: TargetSet, _: Any) -> list[Pass]:
        unmodeled = [t.name for t in targets if not t.cost.modeled]
        if unmodeled:  # resolve() calls build before any work: fail there
            raise ConfigError(f"strategy {name!r} needs a cost model for every target; {unmodeled} have no cost "
                              "model (CostModel.macs_per_second); use 'equal-split' or add one")
        return list(stages)

    return Strategy(
        name, "H3PIMAP: NSGA-II Pareto search over rows per tier (latency, energy)"
        + (f", then row remap until accuracy is within {tolerance} of digital" if remap else ""),
        build, needs_data=remap,
    )


register_strategy(pareto())
register_strategy(pareto(remap=False))
register_strategy(Strategy("equal-split", "every layer's rows split evenly over the tiers that run it",
                           lambda ts, _: [EqualSplit()]))


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES) + ["all-<target>"]


def resolve(name: str | Strategy | None, targets: TargetSet) -> Strategy:
    """The strategy for ``name`` (None: the target set's default). Errors name the known strategies."""
    if name is not None and not isinstance(name, str | Strategy):
        raise ConfigError(f"strategy must be a name such as 'hilal' (known: {', '.join(available_strategies())}), "
                          f"a hetcomp.strategies.Strategy such as hetcomp.strategies.pareto(...), or None for the "
                          f"target set's default; got {checks.got(name)}")
    if isinstance(name, Strategy):
        name.build(targets, None)  # raises now, before any work, if the target set does not fit
        return name
    if name is None:
        name = default_strategy(targets)
    if name in _STRATEGIES:
        strategy = _STRATEGIES[name]
        strategy.build(targets, None)  # raises now, before any work, if the target set does not fit
        return strategy
    if name.startswith("all-") and name[4:] in targets:
        target = name[4:]
        return Strategy(name, f"every layer on {target}", lambda ts, _: [AssignAll(target)])
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
