"""Cached Hessian analyses of a traced graph's weight-static layers, shared by the annotation passes.

The operator (gradient graphs of the calibration batches) and each estimate are cached on the compile
context, so HessianTrace, RowSensitivity, LambdaMax etc. never repeat work: trace and diag(H) come from
the same Hutchinson probes, and all passes reuse the same gradient graphs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis.hessian import HessianOperator, HutchinsonResult
from hetcomp.errors import ConfigError
from hetcomp.graph.layers import WEIGHT_STATIC, LayerAnnotation, mappable_nodes


def weight_layers(gm: fx.GraphModule) -> list[LayerAnnotation]:
    """Weight-static layers in graph order: the layers whose weight Hessians we estimate."""
    return [a for _, a in mappable_nodes(gm) if a.layer.kind == WEIGHT_STATIC and a.layer.weight_param]


def operator(gm: fx.GraphModule, ctx, batches: int, batched: bool = False) -> HessianOperator:
    def build() -> HessianOperator:
        device = ctx.device(gm)
        params = [gm.get_parameter(a.layer.weight_param) for a in weight_layers(gm)]
        return HessianOperator(gm, params, ctx.calibration_batches(batches, device), ctx.loss, batched=batched)

    return ctx.analysis(("hessian-operator", id(gm), batches, batched), build)


def hutchinson(gm: fx.GraphModule, ctx, batches: int, probes: int, estimator: str,
               deflate: tuple[int, float, int] | None = None) -> HutchinsonResult:
    """Hutchinson probes; ``deflate=(max_iter, tol, keep_bytes)``: deflated by the Krylov bases of the Lanczos
    ``dominant_eigenvalue`` run with those settings (shared with LambdaMax through the cache)."""
    def compute() -> HutchinsonResult:
        generator = torch.Generator().manual_seed(ctx.seed)
        vectors = None
        if deflate is not None:
            dominant_eigenvalue(gm, ctx, batches, deflate[0], deflate[1], "lanczos", keep_vectors=True,
                                keep_bytes=deflate[2])
            vectors = ctx.analysis(("krylov-bases", id(gm), batches, deflate[0], deflate[1], ctx.seed), dict)
        return operator(gm, ctx, batches).hutchinson(probes, generator, estimator, deflate=vectors)

    return ctx.analysis(("hutchinson", id(gm), batches, probes, estimator, deflate, ctx.seed), compute)


def kept_vectors(params: list[torch.Tensor], max_iter: int, keep_bytes: int | None) -> int:
    """How many Krylov vectors per layer a deflating Lanczos keeps: ``max_iter``, or fewer so that the kept
    bases and their products (2 k vectors of every layer's size) fit ``keep_bytes``."""
    if keep_bytes is None:
        return max_iter
    per_vector = 2 * sum(p.numel() * p.element_size() for p in params)
    return max(0, min(max_iter, keep_bytes // max(per_vector, 1)))


def dominant_eigenvalue(gm: fx.GraphModule, ctx, batches: int, max_iter: int, tol: float, method: str = "lanczos",
                        keep_vectors: bool = False, keep_bytes: int | None = None):
    """(eigenvalues, iterations used) per weight layer, by ``method`` "lanczos" or "power".
    ``keep_vectors`` (Lanczos): also cache the Krylov bases for deflated Hutchinson, at most ``keep_bytes``
    of them (``kept_vectors``; None: all ``max_iter``)."""
    checks.choice("eigen_method", method, ("lanczos", "power"))
    if keep_vectors and method != "lanczos":
        raise ConfigError("keep_vectors (deflation) needs eigen_method='lanczos'")

    def compute():
        generator = torch.Generator().manual_seed(ctx.seed + 1)
        op = operator(gm, ctx, batches)
        if method == "power":
            return op.power_iteration(max_iter, tol, generator)
        result = op.lanczos(max_iter, tol, generator,
                            keep_vectors=kept_vectors(op.params, max_iter, keep_bytes) if keep_vectors else 0)
        if keep_vectors:
            ctx.analysis(("krylov-bases", id(gm), batches, max_iter, tol, ctx.seed), lambda: dict(op.deflations))
        return result

    # The eigenvalues do not depend on keep_vectors: one cache entry, upgraded when vectors are first needed.
    key = ("dominant-eigenvalue", method, id(gm), batches, max_iter, tol, ctx.seed)
    vectors_key = ("krylov-bases", id(gm), batches, max_iter, tol, ctx.seed)
    if keep_vectors and not ctx.has_analysis(vectors_key):
        ctx.drop_analysis(key)
    return ctx.analysis(key, compute)
