"""The built-in strategies (registered by ``hetcomp.builtins``; the abstraction is hetcomp.partition.strategy).

Built in: ``pareto`` (H3PIMAP: NSGA-II over rows per tier, then accuracy-driven row remap; the default for
several analog tiers; ``pareto(...)`` for settings, ``pareto-po`` for the search alone), ``equal-split``,
``hilal`` (k-means on [HNI, SCR]; the default for one analog target + digital), its
ablations ``hni-only`` and ``scr-only``, ``mac-greedy`` (LionHeart; ``mac_greedy(threshold=...)`` for
other settings), ``all-digital``, ``all-analog`` (the set's one analog target), ``all-<target>`` for any
target in the set, ``first-last-digital`` (DIANA-style). ``default_strategy`` documents what
``strategy=None`` picks.

``Strategy``, ``register_strategy``, ``resolve``, ``available_strategies`` and ``default_strategy`` are
re-exported here for users (``hetcomp.strategies.pareto(...)``, ``hetcomp.strategies.register_strategy``).
"""

from __future__ import annotations

from typing import Any

from hetcomp import checks
from hetcomp.errors import ConfigError
from hetcomp.finetune.mac_greedy import MacGreedy
from hetcomp.partition.strategy import (
    Strategy,
    available_strategies,
    default_strategy,
    register_family,
    register_strategy,
    resolve,
)
from hetcomp.passes.assign import most_accurate_digital, sole_analog
from hetcomp.passes.assign_all import AssignAll
from hetcomp.passes.base import Pass
from hetcomp.passes.equal_split import EqualSplit
from hetcomp.passes.first_last_digital import FirstLastDigital
from hetcomp.passes.kmeans_split import KMeansSplit
from hetcomp.passes.pareto_search import ParetoSearch
from hetcomp.passes.row_remap import RowRemap
from hetcomp.targets.base import TargetSet

__all__ = ["BUILTIN", "Strategy", "available_strategies", "default_strategy", "mac_greedy", "pareto",
           "register_strategy", "resolve"]


BUILTIN: list[Strategy] = []  # registered by hetcomp.builtins


def _builtin(strategy: Strategy) -> Strategy:
    BUILTIN.append(strategy)
    return strategy


_builtin(Strategy(
    "all-digital", "every layer on the most accurate digital target",
    lambda ts, _: [AssignAll(most_accurate_digital(ts, "all-digital"))],
))
_builtin(Strategy(
    "all-analog", "every layer on the set's analog target (ops it cannot run fall back, with a reason)",
    lambda ts, _: [AssignAll(sole_analog(ts, "all-analog"))],
))
_builtin(Strategy(
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


_builtin(_kmeans("hilal", ("hni", "scr"),
                          "HILAL: k-means (k=2) on z-scored [HNI, SCR]; sensitive cluster digital, robust analog"))
_builtin(_kmeans("hni-only", ("hni",), "k-means on HNI alone (HILAL ablation)"))
_builtin(_kmeans("scr-only", ("scr",), "k-means on SCR alone (HILAL ablation)"))


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


_builtin(mac_greedy())


def pareto(population: int = 64, generations: int = 100, samples: float = 1.0, tolerance: float = 0.01,
           step: float = 0.02, candidates: int = 5, repeats: int = 3, max_steps: int = 60,
           remap: bool = True, choose: str = "knee", val_data: Any = None, quality: Any = None,
           higher_is_better: bool = True, checkpoint: Any = None, tier_order: str = "measured") -> Strategy:
    """H3PIMAP with explicit settings: NSGA-II (stage 1) then, with ``remap``, accuracy-driven row remap
    measured on ``val_data`` (default: the data given to compile; pass held-out data). ``quality``,
    ``higher_is_better``, ``checkpoint``, ``tier_order`` ("measured": tiers ordered by their measured single-tier
    quality; "rank": by accuracy_rank): see hetcomp.passes.row_remap.RowRemap."""
    search = ParetoSearch(population, generations, samples, choose)  # validates now, before any work
    checks.boolean("remap", remap)
    stages: list[Pass] = [search]
    if remap:
        stages.append(RowRemap(tolerance, step, candidates, repeats, max_steps, samples, val_data, quality,
                               higher_is_better, checkpoint, tier_order))
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


_builtin(pareto())
_builtin(pareto(remap=False))
_builtin(Strategy("equal-split", "every layer's rows split evenly over the tiers that run it",
                           lambda ts, _: [EqualSplit()]))


def _all_on(target: str, targets: TargetSet) -> Strategy | None:
    """``all-<target>``: every layer on one target of the set."""
    if target not in targets:
        return None
    return Strategy(f"all-{target}", f"every layer on {target}", lambda ts, _: [AssignAll(target)])


register_family("all-", _all_on)
