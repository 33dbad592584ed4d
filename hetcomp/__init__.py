"""hetcomp: compile PyTorch models for heterogeneous analog/digital accelerators.

Pipeline: trace -> annotate -> partition -> lower -> export.
"""

from importlib import metadata as _metadata

from hetcomp import targets
from hetcomp.compiler import CompiledModel, compile
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
from hetcomp.evaluate import Evaluation
from hetcomp.finetune import LAFT
from hetcomp.graph import LayerAnnotation, LayerInfo, mappable_nodes, trace
from hetcomp.manifest import Manifest
from hetcomp.passes import CompileContext, Pass, PassManager
from hetcomp.rebuild import apply_manifest, load

try:
    __version__ = _metadata.version("hetcomp")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CheckpointError", "CompileContext", "CompiledModel", "ConfigError", "DataError", "Evaluation", "HetcompError",
    "LAFT", "LayerAnnotation", "LayerInfo", "Manifest", "ManifestError", "Pass", "PassManager", "PassOrderError",
    "TargetError", "TraceError", "apply_manifest", "compile", "load", "mappable_nodes", "targets", "trace",
]
