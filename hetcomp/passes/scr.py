"""Annotate each weight-static layer with its Spectral Concentration Ratio (HILAL Definition 2)."""

from __future__ import annotations

import math

import torch.fx as fx

from hetcomp.analysis import layer_hessian
from hetcomp.passes.base import CompileContext, Pass


class SCR(Pass):
    """SCR_l = lambda_max(H_l) / Tr(H_l); NaN when the trace estimate is not positive (see HNI)."""

    name = "scr"
    requires = ("hessian_trace", "lambda_max")
    provides = ("scr",)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        for annotation in layer_hessian.weight_layers(gm):
            trace, eigen = annotation.metrics["hessian_trace"], annotation.metrics["lambda_max"]
            annotation.metrics["scr"] = eigen / trace if trace > 0 else math.nan
        return gm
