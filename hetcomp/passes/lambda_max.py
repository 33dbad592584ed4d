"""Annotate each weight-static layer with lambda_max of its weight Hessian (Lanczos or power iteration)."""

from __future__ import annotations

import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis import layer_hessian
from hetcomp.errors import ConfigError
from hetcomp.passes.base import CompileContext, Pass


class LambdaMax(Pass):
    """Dominant eigenvalue of H_l from a random start: ``method="power"`` is power iteration (the
    Rayleigh quotient, as HILAL); ``"lanczos"`` is the dominant Ritz value of a Lanczos run from the
    same kind of start, which reaches the same tolerance in fewer HVPs (bench/hessian.py).

    Power iteration stops when the relative change of the Rayleigh quotient falls under ``tol``;
    Lanczos when its Ritz pair's residual falls under ``tol * |theta|`` (the change between steps
    stagnates and stopped Lanczos too early; see ``HessianOperator.lanczos``).
    ``lambda_max_iterations`` records the iterations used, one HVP each. Both find the eigenvalue of
    largest magnitude; for the (near-)PSD Hessians of trained networks that is the largest one.
    """

    name = "lambda_max"
    requires = ("layers",)
    provides = ("lambda_max",)

    def __init__(self, max_iter: int = 20, tol: float = 1e-3, batches: int = 2, method: str = "lanczos",
                 keep_vectors: bool = False, keep_bytes: int | None = None) -> None:
        self.max_iter = checks.integer("max_iter", max_iter)
        self.tol = checks.real("tol", tol, 0.0)
        self.batches = checks.integer("batches", batches)
        self.method = checks.choice("eigen_method", method, ("lanczos", "power"))
        if checks.boolean("keep_vectors", keep_vectors) and method != "lanczos":
            raise ConfigError("keep_vectors (deflation) needs eigen_method='lanczos'; pass deflate=False to use "
                              "power iteration")
        # Keep the Krylov bases for a deflated HessianTrace later in the pipeline (one Lanczos run, shared).
        self.keep_vectors = keep_vectors
        # At most this many bytes of kept Krylov vectors (bases and their products; None: max_iter of each).
        self.keep_bytes = checks.integer("deflate_bytes", keep_bytes, 0, optional=True)
        self._kept: int | None = None  # Krylov vectors kept per layer, known once the layers are

    def settings(self) -> dict:
        return {"max_iter": self.max_iter, "tol": self.tol, "batches": self.batches, "method": self.method,
                **({"deflate_bytes": self.keep_bytes, "kept_vectors": self._kept} if self.keep_vectors else {})}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        if self.keep_vectors:
            params = [gm.get_parameter(a.layer.weight_param) for a in layer_hessian.weight_layers(gm)]
            self._kept = layer_hessian.kept_vectors(params, self.max_iter, self.keep_bytes)
        eigen, iterations = layer_hessian.dominant_eigenvalue(gm, ctx, self.batches, self.max_iter, self.tol,
                                                              self.method, keep_vectors=self.keep_vectors,
                                                              keep_bytes=self.keep_bytes)
        for annotation, value, used in zip(layer_hessian.weight_layers(gm), eigen, iterations):
            annotation.metrics["lambda_max"] = value
            annotation.metrics["lambda_max_iterations"] = used
        return gm
