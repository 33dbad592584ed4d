"""Annotate each weight-static layer with its Hessian-based Noise Impact (HILAL Definition 1)."""

from __future__ import annotations

import math

import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis import layer_hessian
from hetcomp.passes.base import CompileContext, Pass


class HNI(Pass):
    """HNI_l = sigma_l^2 / (2 d_l) * Tr(H_l), sigma_l = gamma * max|W_l|, d_l = weight entries.

    A non-positive trace estimate (a non-convex layer, or estimator noise around zero) makes HNI
    undefined: it is stored as NaN with ``hessian_trace_nonpositive = True``, and partition passes
    treat NaN as *sensitive* (keep digital) rather than as most robust, as HILAL's code did.
    """

    name = "hni"
    requires = ("hessian_trace",)
    provides = ("hni",)

    def __init__(self, gamma: float = 0.08) -> None:
        self.gamma = checks.real("gamma (relative weight noise)", gamma, 0.0, exclusive=True)

    def settings(self) -> dict:
        return {"gamma": self.gamma}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        for annotation in layer_hessian.weight_layers(gm):
            weight = gm.get_parameter(annotation.layer.weight_param)
            trace = annotation.metrics["hessian_trace"]
            sigma = self.gamma * float(weight.detach().abs().max())
            nonpositive = not trace > 0
            annotation.metrics["hessian_trace_nonpositive"] = nonpositive
            annotation.metrics["hni"] = math.nan if nonpositive else sigma**2 / (2 * weight.numel()) * trace
        return gm
