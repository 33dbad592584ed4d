"""Cached Hessian analyses of a traced graph's weight-static layers, shared by the annotation passes.

The operator (gradient graphs of the calibration batches) and each estimate are cached on the compile
context, so HessianTrace, RowSensitivity, LambdaMax etc. never repeat work: trace and diag(H) come from
the same Hutchinson probes, and all passes reuse the same gradient graphs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from hetcomp.analysis.hessian import HessianOperator, HutchinsonResult
from hetcomp.graph.layers import LayerAnnotation, mappable_nodes
from hetcomp.targets.base import WEIGHT_STATIC


def weight_layers(gm: fx.GraphModule) -> list[LayerAnnotation]:
    """Weight-static layers in graph order: the layers whose weight Hessians we estimate."""
    return [a for _, a in mappable_nodes(gm) if a.layer.kind == WEIGHT_STATIC and a.layer.weight_param]


def operator(gm: fx.GraphModule, ctx, batches: int, batched: bool = False) -> HessianOperator:
    def build() -> HessianOperator:
        device = ctx.device(gm)
        params = [gm.get_parameter(a.layer.weight_param) for a in weight_layers(gm)]
        return HessianOperator(gm, params, ctx.calibration_batches(batches, device), ctx.loss, batched=batched)

    return ctx.analysis(("hessian-operator", id(gm), batches, batched), build)


def hutchinson(gm: fx.GraphModule, ctx, batches: int, probes: int, estimator: str) -> HutchinsonResult:
    def compute() -> HutchinsonResult:
        generator = torch.Generator().manual_seed(ctx.seed)
        return operator(gm, ctx, batches).hutchinson(probes, generator, estimator)

    return ctx.analysis(("hutchinson", id(gm), batches, probes, estimator, ctx.seed), compute)


def dominant_eigenvalue(gm: fx.GraphModule, ctx, batches: int, max_iter: int, tol: float, method: str = "lanczos"):
    """(eigenvalues, iterations used) per weight layer, by ``method`` "lanczos" or "power"."""
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")

    def compute():
        generator = torch.Generator().manual_seed(ctx.seed + 1)
        op = operator(gm, ctx, batches)
        return (op.lanczos if method == "lanczos" else op.power_iteration)(max_iter, tol, generator)

    return ctx.analysis(("dominant-eigenvalue", method, id(gm), batches, max_iter, tol, ctx.seed), compute)
