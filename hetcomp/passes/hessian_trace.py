"""Annotate each weight-static layer with Tr(H_l), the Hutchinson trace of its weight Hessian."""

from __future__ import annotations

import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis import layer_hessian
from hetcomp.errors import ConfigError
from hetcomp.passes.base import CompileContext, Pass


class HessianTrace(Pass):
    """Tr(H_l) of the loss Hessian w.r.t. the layer's weight (bias excluded), Rademacher probes.

    ``estimator="full"`` (default): one full-model HVP per probe serves every layer; ``"block"``: one
    HVP per layer per probe, lower variance (see hetcomp.analysis.hessian). ``deflate=(max_iter, tol,
    keep_bytes)``: deflated Hutchinson, Tr(H) = Tr(Q^T H Q) + Tr(P H P) with Q the Krylov basis of the
    LambdaMax Lanczos run with those settings (shared, not recomputed; H Q is known from it, so no extra
    HVP), at most ``keep_bytes`` of kept vectors (None: all); unbiased, with less variance per probe.
    """

    name = "hessian_trace"
    requires = ("layers",)
    provides = ("hessian_trace",)

    def __init__(self, probes: int = 10, estimator: str = "full", batches: int = 2,
                 deflate: tuple[int, float, int | None] | None = None) -> None:
        self.probes = checks.integer("probes", probes)
        self.estimator = checks.choice("estimator", estimator, ("full", "block"))
        self.batches = checks.integer("batches", batches)
        self.deflate = deflation_settings(deflate)

    def settings(self) -> dict:
        return {"probes": self.probes, "estimator": self.estimator, "batches": self.batches,
                "probe_distribution": "rademacher", "parameters": "weight only (bias excluded)",
                "deflated_by_lanczos": None if self.deflate is None else list(self.deflate)}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        result = layer_hessian.hutchinson(gm, ctx, self.batches, self.probes, self.estimator, self.deflate)
        for annotation, trace, stderr in zip(layer_hessian.weight_layers(gm), result.trace, result.trace_stderr):
            annotation.metrics["hessian_trace"] = trace
            annotation.metrics["hessian_trace_stderr"] = stderr
        return gm


def deflation_settings(deflate: tuple | None) -> tuple[int, float, int | None] | None:
    """``deflate`` checked: None or (max_iter >= 1, tol >= 0[, keep_bytes >= 0 or None]) of the LambdaMax run
    whose bases deflate."""
    if deflate is None:
        return None
    if not isinstance(deflate, tuple | list) or len(deflate) not in (2, 3):
        raise ConfigError(f"deflate must be None or (max_iter, tol[, keep_bytes]) of the LambdaMax run, got "
                          f"{checks.got(deflate)}")
    keep_bytes = deflate[2] if len(deflate) == 3 else None
    return (checks.integer("deflate max_iter", deflate[0]), checks.real("deflate tol", deflate[1], 0.0),
            checks.integer("deflate_bytes", keep_bytes, 0, optional=True))
