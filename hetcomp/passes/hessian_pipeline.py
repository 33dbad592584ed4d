"""The standard annotation pipeline (registered as "hessian" by hetcomp.builtins; compile runs it when given
data): Tr(H), lambda_max, HNI, SCR, row sensitivity."""

from __future__ import annotations

from hetcomp import checks
from hetcomp.errors import ConfigError
from hetcomp.passes.base import Pass
from hetcomp.passes.hessian_trace import HessianTrace
from hetcomp.passes.hni import HNI
from hetcomp.passes.lambda_max import LambdaMax
from hetcomp.passes.row_sensitivity import RowSensitivity
from hetcomp.passes.scr import SCR


def hessian_passes(probes: int = 10, max_iter: int = 20, tol: float = 1e-3, batches: int = 2,
                   estimator: str = "block", gamma: float | None = None, eigen_method: str = "lanczos",
                   deflate: bool = True, deflate_bytes: int | None = 2 << 30) -> list[Pass]:
    """The standard annotation pipeline: Tr(H), lambda_max, HNI, SCR, row sensitivity.

    Defaults are the accurate estimator: per-layer (block) HVPs with Krylov deflation. ``deflate=True``:
    LambdaMax (Lanczos) runs first and its Krylov bases deflate the Hutchinson probes of the trace and row
    sensitivity (same HVPs, less variance; see HessianTrace). With the issue's former default (``estimator=
    "full"``, no deflation, 10 probes) the digits CNN's hilal split changed with the seed; with these it does
    not (tests/test_partition_stability.py). ``deflate_bytes``: at most this much memory for the kept Krylov
    vectors (2 per step per layer; None: all ``max_iter``), so deflation of big models stays bounded: a
    50M-parameter model keeps 5 vectors per layer in the default 2 GiB."""
    checks.choice("eigen_method", eigen_method, ("lanczos", "power"))
    if checks.boolean("deflate", deflate) and eigen_method != "lanczos":
        raise ConfigError("deflate=True needs eigen_method='lanczos' (its Krylov bases deflate the probes)")
    eigen = LambdaMax(max_iter=max_iter, tol=tol, batches=batches, method=eigen_method, keep_vectors=deflate,
                      keep_bytes=deflate_bytes)
    deflation = (max_iter, tol, deflate_bytes) if deflate else None
    trace = HessianTrace(probes=probes, estimator=estimator, batches=batches, deflate=deflation)
    return [
        *([eigen, trace] if deflate else [trace, eigen]),
        HNI(gamma=gamma),
        SCR(),
        RowSensitivity(probes=probes, estimator=estimator, batches=batches, deflate=deflation),
    ]
