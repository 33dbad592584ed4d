"""Partition: every (not yet assigned) layer to one target."""

from __future__ import annotations

import torch.fx as fx

from hetcomp.graph.layers import mappable_nodes
from hetcomp.passes.assign import assign_layer
from hetcomp.passes.base import CompileContext, Pass


class AssignAll(Pass):
    name = "assign_all"
    requires = ("layers",)
    provides = ("assignment",)

    def __init__(self, target: str) -> None:
        self.target = target

    def settings(self) -> dict:
        return {"target": self.target}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        for _, annotation in mappable_nodes(gm):
            assign_layer(annotation, self.target, ctx.targets, self.name, f"every layer to {self.target}")
        return gm
