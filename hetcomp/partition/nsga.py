"""Stage 1 of H3PIMAP (Algorithm 1): NSGA-II over per-layer row counts, latency vs energy (pymoo).

Decision variables: for each layer, the rows on each tier that runs its op kind (integers), counted in
units (a grouped convolution's whole groups, else single rows). A repair rescales each layer's counts to
sum to its units (largest remainder), so every candidate is a complete mapping; capacity is an inequality
constraint (pymoo's feasibility-first comparison). The whole population is evaluated in one vectorized
call (``MappingProblem.evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.indicators.hv import HV
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.operators.sampling.rnd import IntegerRandomSampling
from pymoo.optimize import minimize

from hetcomp.partition.mapping_cost import MappingProblem
from hetcomp.progress import bar


class RowCountProblem(Problem):
    """pymoo view of a MappingProblem: variables are the allowed (layer, tier) counts of units (groups of a
    grouped convolution, rows otherwise), so every count the search produces is whole groups."""

    def __init__(self, mapping: MappingProblem) -> None:
        self.mapping = mapping
        self.layer_of, self.tier_of = np.nonzero(mapping.allowed)  # one variable per allowed pair
        self.units = mapping.rows // mapping.unit  # (L,) units per layer
        upper = self.units[self.layer_of]
        bounded = np.isfinite(mapping.capacity)
        super().__init__(n_var=len(self.layer_of), n_obj=2, n_ieq_constr=int(bounded.sum()),
                         xl=np.zeros(len(upper)), xu=upper.astype(float), vtype=int)
        self.bounded = bounded

    def counts(self, x: np.ndarray) -> np.ndarray:
        """(P, V) variables (units) -> (P, L, n) row counts summing to each layer's rows."""
        x = np.atleast_2d(np.asarray(x, dtype=float)).clip(min=0)
        population = x.shape[0]
        layers, tiers = self.mapping.allowed.shape
        weights = np.zeros((population, layers, tiers))
        weights[:, self.layer_of, self.tier_of] = x
        allowed = self.mapping.allowed[None].astype(float)
        totals = weights.sum(axis=2, keepdims=True)
        weights = np.where(totals > 0, weights, allowed)  # all-zero layer: split evenly
        share = weights / weights.sum(axis=2, keepdims=True) * self.units[None, :, None]
        counts = np.floor(share)
        missing = (self.units[None, :] - counts.sum(axis=2)).astype(int)  # 0 .. n-1 units short
        # Largest remainder: the `missing` tiers with the biggest fractional parts get one more unit.
        rank = np.argsort(np.argsort(-(share - counts) - 2 * (1 - allowed), axis=2), axis=2)
        counts += rank < missing[..., None]
        return counts.astype(np.int64) * self.mapping.unit[None, :, None]

    def variables(self, counts: np.ndarray) -> np.ndarray:
        """(P, L, n) or (L, n) row counts -> (P, V) variables in units (inverse of ``counts``)."""
        counts = np.asarray(counts)
        counts = counts if counts.ndim == 3 else counts[None]
        return counts[:, self.layer_of, self.tier_of] // self.mapping.unit[self.layer_of]

    def _evaluate(self, x, out, *args, **kwargs):
        cost = self.mapping.evaluate(self.counts(x))
        out["F"] = np.column_stack([cost.latency_s, cost.energy_j])
        if self.n_ieq_constr:
            out["G"] = self.mapping.capacity_violation(cost.usage)[:, self.bounded]


class SumRepair(Repair):
    """Make every candidate a complete mapping (counts sum to each layer's rows)."""

    def _do(self, problem, x, **kwargs):
        return problem.variables(problem.counts(x)).astype(float)


@dataclass
class ParetoResult:
    counts: np.ndarray  # (K, L, n) the non-dominated feasible mappings, by latency
    latency_s: np.ndarray
    energy_j: np.ndarray
    hypervolume: list[float]  # per generation, normalized objectives (see run_nsga2)
    evaluations: int


class _Progress(Callback):
    def __init__(self, generations: int, scale: np.ndarray) -> None:
        super().__init__()
        self.indicator = HV(ref_point=np.ones(2))
        self.scale = scale
        self.hypervolume: list[float] = []
        self.bar = bar(generations, "NSGA-II")

    def notify(self, algorithm):
        opt = algorithm.opt
        feasible = opt.get("CV")[:, 0] <= 0 if len(opt) else np.zeros(0, dtype=bool)
        front = opt.get("F")[feasible] if feasible.any() else np.zeros((0, 2))
        value = float(self.indicator(front / self.scale)) if len(front) else 0.0
        self.hypervolume.append(value)
        self.bar.update(1)
        self.bar.set_postfix(hv=f"{value:.4f}", front=len(front))


def run_nsga2(mapping: MappingProblem, population: int = 64, generations: int = 100, seed: int = 0,
              seeds: list[np.ndarray] | None = None) -> ParetoResult:
    """The Pareto front of latency vs energy. Hypervolume is of objectives divided by the all-in-one-tier
    baselines' worst latency and energy (reference point (1, 1)), so it is comparable between runs.

    ``seeds``: row-count mappings put into the first population (the single-tier and equal-split baselines
    are always added, so the front is never worse than them where they are feasible).
    """
    mapping.check_feasible()
    problem = RowCountProblem(mapping)
    baselines = [mapping.single_tier(t.name) for t in mapping.tiers] + [mapping.equal_split()]
    start = problem.variables(np.stack(baselines + list(seeds or []))).astype(float)
    base_cost = mapping.evaluate(np.stack(baselines))
    scale = np.array([base_cost.latency_s.max(), base_cost.energy_j.max()]) * 1.1
    rng = np.random.default_rng(seed)
    random = IntegerRandomSampling()._do(problem, max(population - len(start), 0), random_state=rng) \
        if population > len(start) else np.zeros((0, problem.n_var))
    initial = problem.variables(problem.counts(np.vstack([start, random])[:population])).astype(float)
    algorithm = NSGA2(
        pop_size=population,
        sampling=initial,
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        repair=SumRepair(),
        eliminate_duplicates=True,
    )
    callback = _Progress(generations, scale)
    result = minimize(problem, algorithm, ("n_gen", generations), seed=seed, callback=callback, verbose=False)
    callback.bar.close()
    opt = result.opt
    feasible = opt.get("CV")[:, 0] <= 0
    if not feasible.any():
        raise RuntimeError("NSGA-II found no mapping within the tiers' capacities")  # check_feasible rules this out
    x = opt.get("X")[feasible]
    counts = problem.counts(x)
    cost = mapping.evaluate(counts)
    order = np.argsort(cost.latency_s)
    return ParetoResult(counts[order], cost.latency_s[order], cost.energy_j[order], callback.hypervolume,
                        int(result.algorithm.evaluator.n_eval))
