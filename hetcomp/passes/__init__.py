"""Passes: annotation (Hessian metrics), partition (assignment), and the infrastructure that runs them.

``hetcomp.passes.base`` is the infrastructure (Pass, PassManager, CompileContext); every concrete pass is one
file here. This package loads a pass's module only when its name is first used (``hetcomp.passes.HNI``), so
importing the infrastructure loads no concrete pass.
"""

from __future__ import annotations

import importlib
from typing import Any

from hetcomp.passes.base import CompileContext, Pass, PassManager

_LAZY = {
    "AssignAll": "assign_all", "EqualSplit": "equal_split", "FirstLastDigital": "first_last_digital",
    "HNI": "hni", "HessianTrace": "hessian_trace", "LambdaMax": "lambda_max", "ParetoSearch": "pareto_search",
    "RowRemap": "row_remap", "RowSensitivity": "row_sensitivity", "SCR": "scr", "hessian_passes": "hessian_pipeline",
}

__all__ = ["CompileContext", "Pass", "PassManager", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"hetcomp.passes.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hetcomp.passes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
