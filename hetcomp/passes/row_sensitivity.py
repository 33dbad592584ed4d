"""Annotate each weight-static layer with per-output-row sensitivity (H3PIMAP Eq. 4)."""

from __future__ import annotations

import torch
import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis import layer_hessian
from hetcomp.lower.simulator import DEFAULT_WEIGHT_NOISE, noisiest_analog  # the targets' physics
from hetcomp.passes.base import CompileContext, Pass
from hetcomp.passes.hessian_trace import deflation_settings


class RowSensitivity(Pass):
    """Expected second-order loss increase when row r of W_l suffers the target's weight error:

        S_r = g_r . delta_r + 1/2 * sum_j diag(H)_rj * (delta_rj^2 + sigma^2)

    with g the loss gradient, diag(H) by Hutchinson (v * Hv, the same probes as HessianTrace), delta the
    deterministic weight-quantization error at ``weight_bits`` (0 if None) and sigma = gamma * max|W_l|
    the random noise (its first-order term vanishes in expectation). By default gamma and weight_bits
    come from the noisiest analog target in the target set that runs weight-static layers.
    """

    name = "row_sensitivity"
    requires = ("layers",)
    provides = ("row_sensitivity",)

    def __init__(self, gamma: float | None = None, weight_bits: int | None = None, probes: int = 10,
                 estimator: str = "full", batches: int = 2, deflate: tuple[int, float] | None = None) -> None:
        self.gamma = checks.real("gamma (relative weight noise)", gamma, 0.0, optional=True)
        self.weight_bits = checks.integer("weight_bits", weight_bits, 2, optional=True)
        self.probes = checks.integer("probes", probes)
        self.estimator = checks.choice("estimator", estimator, ("full", "block"))
        self.batches = checks.integer("batches", batches)
        self.deflate = deflation_settings(deflate)
        self._resolved: dict = {}

    def settings(self) -> dict:
        return {"probes": self.probes, "estimator": self.estimator, "batches": self.batches, **self._resolved}

    def _noise(self, ctx: CompileContext) -> tuple[float, int | None, str | None]:
        source, noise = noisiest_analog(ctx.targets)
        gamma = self.gamma if self.gamma is not None else (noise if source else DEFAULT_WEIGHT_NOISE)
        bits = self.weight_bits if self.weight_bits is not None else (
            source.precision.weight_bits if source and self.gamma is None else None)
        return gamma, bits, source.name if source and self.gamma is None else None

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        gamma, bits, source = self._noise(ctx)
        self._resolved = {"gamma": gamma, "weight_bits": bits, "noise_from_target": source}
        result = layer_hessian.hutchinson(gm, ctx, self.batches, self.probes, self.estimator, self.deflate)
        gradient = layer_hessian.operator(gm, ctx, self.batches).gradient
        for annotation, diag, grad in zip(layer_hessian.weight_layers(gm), result.diag, gradient):
            weight = gm.get_parameter(annotation.layer.weight_param).detach()
            delta = quantization_error(weight, bits)
            sigma = gamma * float(weight.abs().max())
            rows = weight.shape[0]
            first = (grad * delta).reshape(rows, -1).sum(1)
            second = 0.5 * (diag * (delta**2 + sigma**2)).reshape(rows, -1).sum(1)
            annotation.metrics["row_sensitivity"] = (first + second).double().cpu().tolist()
        return gm


def quantization_error(weight: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Error of symmetric per-layer uniform quantization at ``bits`` (zeros when bits is None)."""
    if bits is None:
        return torch.zeros_like(weight)
    levels = 2 ** (bits - 1) - 1
    scale = weight.abs().max() / levels
    if scale == 0:
        return torch.zeros_like(weight)
    return torch.round(weight / scale) * scale - weight
