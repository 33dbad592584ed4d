"""Partition baseline: every layer's rows (a grouped convolution's in whole groups) split as evenly as possible over
the tiers that run it."""

from __future__ import annotations

import torch.fx as fx

from hetcomp.graph.layers import mappable_nodes
from hetcomp.partition.rows import apply_counts
from hetcomp.passes.base import CompileContext, Pass
from hetcomp.passes.pareto_search import mapping_problem


class EqualSplit(Pass):
    name = "equal_split"
    requires = ("layers",)
    provides = ("assignment",)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        problem = mapping_problem(gm, ctx, 1.0, require_costs=False)  # an even split needs no costs
        for annotation, counts in zip((a for _, a in mappable_nodes(gm)), problem.equal_split()):
            if annotation.assignment is None:
                apply_counts(annotation, counts, problem.tiers, f"{self.name}: rows split evenly over the tiers "
                             "that run this op")
        return gm
