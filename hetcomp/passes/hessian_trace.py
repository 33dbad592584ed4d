"""Annotate each weight-static layer with Tr(H_l), the Hutchinson trace of its weight Hessian."""

from __future__ import annotations

import torch.fx as fx

from hetcomp.analysis import layer_hessian
from hetcomp.passes.base import CompileContext, Pass


class HessianTrace(Pass):
    """Tr(H_l) of the loss Hessian w.r.t. the layer's weight (bias excluded), Rademacher probes.

    ``estimator="full"`` (default): one full-model HVP per probe serves every layer; ``"block"``: one
    HVP per layer per probe, lower variance (see hetcomp.analysis.hessian). ``deflate=(max_iter, tol)``:
    deflated Hutchinson, Tr(H) = Tr(Q^T H Q) + Tr(P H P) with Q the Krylov basis of the LambdaMax
    Lanczos run with those settings (shared, not recomputed; H Q is known from it, so no extra HVP);
    unbiased, with less variance per probe.
    """

    name = "hessian_trace"
    requires = ("layers",)
    provides = ("hessian_trace",)

    def __init__(self, probes: int = 10, estimator: str = "full", batches: int = 2,
                 deflate: tuple[int, float] | None = None) -> None:
        if probes < 1 or batches < 1:
            raise ValueError("probes and batches must be >= 1")
        if estimator not in ("full", "block"):
            raise ValueError(f"estimator must be 'full' or 'block', got {estimator!r}")
        self.probes, self.estimator, self.batches, self.deflate = probes, estimator, batches, deflate

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
