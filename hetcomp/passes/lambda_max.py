"""Annotate each weight-static layer with lambda_max of its weight Hessian (power iteration)."""

from __future__ import annotations

import torch.fx as fx

from hetcomp.analysis import layer_hessian
from hetcomp.passes.base import CompileContext, Pass


class LambdaMax(Pass):
    """Dominant eigenvalue of H_l by power iteration from a random start (Rayleigh quotient).

    Stops per layer when the relative change falls under ``tol`` (``lambda_max_iterations`` records the
    iterations used). Power iteration finds the eigenvalue of largest magnitude; for the (near-)PSD
    Hessians of trained networks that is the largest one.
    """

    name = "lambda_max"
    requires = ("layers",)
    provides = ("lambda_max",)

    def __init__(self, max_iter: int = 20, tol: float = 1e-3, batches: int = 2) -> None:
        if max_iter < 1 or batches < 1 or tol < 0:
            raise ValueError("max_iter and batches must be >= 1 and tol >= 0")
        self.max_iter, self.tol, self.batches = max_iter, tol, batches

    def settings(self) -> dict:
        return {"max_iter": self.max_iter, "tol": self.tol, "batches": self.batches}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        eigen, iterations = layer_hessian.power_iteration(gm, ctx, self.batches, self.max_iter, self.tol)
        for annotation, value, used in zip(layer_hessian.weight_layers(gm), eigen, iterations):
            annotation.metrics["lambda_max"] = value
            annotation.metrics["lambda_max_iterations"] = used
        return gm
