"""Cached Hessian analyses of a traced graph's weight-static layers, shared by the annotation passes.

The operator (gradient graphs of the calibration batches) and each estimate are cached on the compile
context, so HessianTrace, RowSensitivity, LambdaMax etc. never repeat work: trace and diag(H) come from
the same Hutchinson probes, and all passes reuse the same gradient graphs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis.cache import AnalysisKey
from hetcomp.analysis.hessian import HessianOperator, HutchinsonResult
from hetcomp.errors import ConfigError
from hetcomp.graph.layers import WEIGHT_STATIC, LayerAnnotation, mappable_nodes


def weight_layers(gm: fx.GraphModule) -> list[LayerAnnotation]:
    """Weight-static layers in graph order: the layers whose weight Hessians we estimate."""
    return [a for _, a in mappable_nodes(gm) if a.layer.kind == WEIGHT_STATIC and a.layer.weight_param]


@dataclass(frozen=True)
class OperatorKey(AnalysisKey):
    """The gradient graphs of the first ``batches`` calibration batches."""

    batches: int
    batched: bool


@dataclass(frozen=True)
class HutchinsonKey(AnalysisKey):
    batches: int
    probes: int
    estimator: str
    deflate: tuple | None


@dataclass(frozen=True)
class EigenKey(AnalysisKey):
    method: str
    batches: int
    max_iter: int
    tol: float


@dataclass(frozen=True)
class KrylovBasesKey(AnalysisKey):
    """The Krylov bases the Lanczos run of ``EigenKey("lanczos", batches, max_iter, tol)`` kept within
    ``keep_bytes``."""

    batches: int
    max_iter: int
    tol: float
    keep_bytes: int | None


def operator(gm: fx.GraphModule, ctx, batches: int, batched: bool = False) -> HessianOperator:
    def build() -> HessianOperator:
        device = ctx.device(gm)
        params = [gm.get_parameter(a.layer.weight_param) for a in weight_layers(gm)]
        return HessianOperator(gm, params, ctx.calibration_batches(batches, device), ctx.loss, batched=batched,
                               process_group=ctx.config.process_group, fmt=ctx.fmt)

    return ctx.analysis(OperatorKey(batches, batched), build)


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
            vectors = ctx.analysis(KrylovBasesKey(batches, deflate[0], deflate[1], deflate[2]), dict)
        return operator(gm, ctx, batches).hutchinson(probes, generator, estimator, deflate=vectors)

    return ctx.analysis(HutchinsonKey(batches, probes, estimator, None if deflate is None else tuple(deflate)),
                        compute)


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
    key = EigenKey(method, batches, max_iter, tol)
    bases = KrylovBasesKey(batches, max_iter, tol, keep_bytes)

    def compute():
        generator = torch.Generator().manual_seed(ctx.seed + 1)
        op = operator(gm, ctx, batches)
        if method == "power":
            return op.power_iteration(max_iter, tol, generator)
        keep = kept_vectors(op.params, max_iter, keep_bytes) if keep_vectors else 0
        if keep_vectors and keep == 0:
            size = sum(p.numel() * p.element_size() for p in op.params)
            warnings.warn(f"deflate_bytes={keep_bytes:,} holds not one Krylov vector of every layer (2 x {size:,} "
                          "bytes): the trace is not deflated; raise hessian=dict(deflate_bytes=...)", stacklevel=2)
        result = op.lanczos(max_iter, tol, generator, keep_vectors=keep)
        if keep_vectors:
            ctx.analysis(bases, lambda: dict(op.deflations))
        return result

    # The eigenvalues do not depend on keep_vectors: one cache entry, recomputed when vectors are first needed.
    if keep_vectors and bases not in ctx.analyses:
        ctx.analyses.drop(key)
    return ctx.analysis(key, compute)
