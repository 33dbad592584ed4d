"""Partition, H3PIMAP stage 1 (PO): NSGA-II over each layer's row counts per tier, latency vs energy.

Layers a user pass already assigned stay where they are (their counts are fixed). The Pareto front
(latency, energy and row counts of each point) goes to the manifest's ``extra["pareto"]``; the point
chosen here (``choose``: "knee" = nearest the ideal point after normalizing both objectives over the
front, "min-latency" or "min-energy") is applied, most sensitive rows on the most accurate tiers. A
following ``RowRemap`` pass re-chooses among the front by measured accuracy. Under torch.distributed the
search runs on rank 0 (it is fast) and its result is broadcast, so every rank applies the same point.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx

from hetcomp import checks, distributed
from hetcomp.graph.layers import mappable_nodes
from hetcomp.partition.mapping_cost import MappingProblem
from hetcomp.partition.rows import apply_counts, counts_of
from hetcomp.passes.base import CompileContext, Pass

CHOICES = ("knee", "min-latency", "min-energy")


def mapping_problem(gm: fx.GraphModule, ctx: CompileContext, samples: float, pinned: list[bool] | None = None,
                    require_costs: bool = True) -> MappingProblem:
    """The cost problem of the graph's layers on the context's targets; ``pinned`` layers (default: those
    already assigned) keep their current tiers."""
    annotations = [a for _, a in mappable_nodes(gm)]
    problem = MappingProblem.build([a.layer for a in annotations], ctx.targets, samples=samples,
                                   require_costs=require_costs)
    if pinned is None:
        pinned = [a.assignment is not None for a in annotations]
    for index, annotation in enumerate(annotations):
        if pinned[index]:
            problem.allowed[index] = np.array(counts_of(annotation, problem.tiers)) > 0
    return problem


def choose_point(latency: np.ndarray, energy: np.ndarray, choose: str) -> int:
    if choose == "min-latency":
        return int(np.argmin(latency))
    if choose == "min-energy":
        return int(np.argmin(energy))
    span = lambda v: (v - v.min()) / (v.max() - v.min() if v.max() > v.min() else 1.0)  # noqa: E731
    return int(np.argmin(np.hypot(span(latency), span(energy))))


class ParetoSearch(Pass):
    name = "pareto_search"
    requires = ("layers",)
    provides = ("assignment", "pareto_front")

    def __init__(self, population: int = 64, generations: int = 100, samples: float = 1.0, choose: str = "knee"
                 ) -> None:
        self.population = checks.integer("NSGA-II population", population, 4)
        self.generations = checks.integer("NSGA-II generations", generations)
        self.samples = checks.real("samples (workload = samples x one forward of the example input)", samples, 0.0,
                                   exclusive=True)
        self.choose = checks.choice("choose", choose, CHOICES)

    def settings(self) -> dict:
        return {"population": self.population, "generations": self.generations, "samples": self.samples,
                "choose": self.choose}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        from hetcomp.partition.nsga import run_nsga2  # pymoo is imported only when the search runs

        problem = mapping_problem(gm, ctx, self.samples)
        # Under torch.distributed rank 0 alone searches and every rank takes its front: seeded NSGA-II is
        # deterministic, but floats computed on other nodes' CPUs need not be bitwise equal, and every rank
        # must apply the same counts.
        result = distributed.on_main(lambda: run_nsga2(problem, self.population, self.generations, seed=ctx.seed))
        chosen = choose_point(result.latency_s, result.energy_j, self.choose)
        for annotation, counts in zip((a for _, a in mappable_nodes(gm)), result.counts[chosen]):
            if annotation.assignment is None:
                apply_counts(annotation, counts, problem.tiers,
                             f"{self.name}: Pareto point {chosen} ({self.choose}) of {len(result.latency_s)}")
        ctx.manifest_extra["pareto"] = {
            "tiers": problem.names,
            "samples": self.samples,
            "front": [{"latency_s": float(lat), "energy_j": float(en), "counts": counts.tolist()}
                      for lat, en, counts in zip(result.latency_s, result.energy_j, result.counts)],
            "chosen": chosen,
            "hypervolume": result.hypervolume,
            "evaluations": result.evaluations,
        }
        return gm
