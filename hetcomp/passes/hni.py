"""Annotate each weight-static layer with its Hessian-based Noise Impact (HILAL Definition 1)."""

from __future__ import annotations

import math

import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis import layer_hessian
from hetcomp.lower.simulator import hessian_noise
from hetcomp.passes.base import CompileContext, Pass


class HNI(Pass):
    """HNI_l = sigma_l^2 / (2 d_l) * Tr(H_l), sigma_l = gamma * max|W_l|, d_l = weight entries. ``gamma`` None
    (the default): the weight noise of the set's noisiest analog target, as its simulator states it (PCM:
    0.08, HILAL's gamma), 0.08 where no analog target has weight noise.

    A non-positive trace estimate (a non-convex layer, or estimator noise around zero) makes HNI
    undefined: it is stored as NaN with ``hessian_trace_nonpositive = True``, and partition passes
    treat NaN as *sensitive* (keep digital) rather than as most robust, as HILAL's code did.
    """

    name = "hni"
    requires = ("hessian_trace",)
    provides = ("hni",)

    def __init__(self, gamma: float | None = None) -> None:
        self.gamma = checks.real("gamma (relative weight noise)", gamma, 0.0, exclusive=True, optional=True)
        self._resolved: dict = {}

    def settings(self) -> dict:
        return {"gamma": self.gamma, **self._resolved}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        # gamma None: the target's own physics (its simulator's weight noise; 0.08 for PCM, HILAL's gamma)
        gamma, source = (self.gamma, None) if self.gamma is not None else hessian_noise(ctx.targets)
        self._resolved = {"gamma": gamma, "noise_from_target": None if source is None else source.name}
        for annotation in layer_hessian.weight_layers(gm):
            weight = gm.get_parameter(annotation.layer.weight_param)
            trace = annotation.metrics["hessian_trace"]
            sigma = gamma * float(weight.detach().abs().max())
            nonpositive = not trace > 0
            annotation.metrics["hessian_trace_nonpositive"] = nonpositive
            annotation.metrics["hni"] = math.nan if nonpositive else sigma**2 / (2 * weight.numel()) * trace
        return gm
