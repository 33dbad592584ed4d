"""hetcomp: compile PyTorch models for heterogeneous analog/digital accelerators.

Pipeline: trace -> annotate -> partition -> lower -> export.

The public names below are loaded on first use (PEP 562), so ``import hetcomp.passes.base`` (to write a
pass) or ``import hetcomp.graph`` loads only what those need: importing the core never loads a concrete
pass, target or strategy.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import Any

from hetcomp.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HetcompError,
    ManifestError,
    PassOrderError,
    TargetError,
    TraceError,
)

try:
    __version__ = _metadata.version("hetcomp")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "CompiledModel": "hetcomp.compiler", "compile": "hetcomp.compiler",
    "apply_manifest": "hetcomp.rebuild", "load": "hetcomp.rebuild",
    "Evaluation": "hetcomp.evaluate", "LAFT": "hetcomp.finetune",
    "LayerAnnotation": "hetcomp.graph", "LayerInfo": "hetcomp.graph", "mappable_nodes": "hetcomp.graph",
    "trace": "hetcomp.graph", "Manifest": "hetcomp.manifest",
    "CompileConfig": "hetcomp.passes.base", "CompileContext": "hetcomp.passes.base", "Pass": "hetcomp.passes.base",
    "PassManager": "hetcomp.passes.base", "PassInstrument": "hetcomp.passes.base",
}

__all__ = [
    "CheckpointError", "CompileConfig", "CompileContext", "CompiledModel", "ConfigError", "DataError", "Evaluation",
    "HetcompError", "LAFT", "LayerAnnotation", "LayerInfo", "Manifest", "ManifestError", "Pass", "PassInstrument",
    "PassManager", "PassOrderError", "TargetError", "TraceError", "apply_manifest", "compile", "load",
    "mappable_nodes", "strategies", "targets", "trace",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:  # a submodule: hetcomp.strategies, hetcomp.plots, ...
        try:
            value = importlib.import_module(f"hetcomp.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"hetcomp.{name}":
                raise
            raise AttributeError(f"module 'hetcomp' has no attribute {name!r}") from None
    globals()[name] = value  # cached: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
