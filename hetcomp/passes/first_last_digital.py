"""Partition (DIANA-style baseline): first and last mappable layers digital, the rest analog."""

from __future__ import annotations

import torch.fx as fx

from hetcomp.graph.layers import mappable_nodes
from hetcomp.passes.assign import assign_layer
from hetcomp.passes.base import CompileContext, Pass


class FirstLastDigital(Pass):
    name = "first_last_digital"
    requires = ("layers",)
    provides = ("assignment",)

    def __init__(self, digital: str, analog: str) -> None:
        self.digital, self.analog = digital, analog

    def settings(self) -> dict:
        return {"digital": self.digital, "analog": self.analog}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        annotations = [a for _, a in mappable_nodes(gm)]
        for position, annotation in enumerate(annotations):
            if position in (0, len(annotations) - 1):
                which = "first" if position == 0 else "last"
                assign_layer(annotation, self.digital, ctx.targets, self.name,
                             f"{which} mappable layer stays digital (input/output precision)")
            else:
                assign_layer(annotation, self.analog, ctx.targets, self.name, "inner layer to analog")
        return gm
