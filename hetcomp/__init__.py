"""hetcomp: compile PyTorch models for heterogeneous analog/digital accelerators.

Pipeline: trace -> annotate -> partition -> lower -> export.
"""

from hetcomp import targets
from hetcomp.compiler import CompiledModel, apply_manifest, compile
from hetcomp.errors import ConfigError, HetcompError, ManifestError, PassOrderError, TargetError, TraceError
from hetcomp.evaluate import Evaluation
from hetcomp.finetune import LAFT
from hetcomp.graph import LayerAnnotation, LayerInfo, mappable_nodes, trace
from hetcomp.manifest import Manifest
from hetcomp.passes import CompileContext, Pass, PassManager

__version__ = "0.1.0"

__all__ = [
    "CompileContext", "CompiledModel", "ConfigError", "Evaluation", "HetcompError", "LAFT", "LayerAnnotation",
    "LayerInfo", "Manifest", "ManifestError", "Pass", "PassManager", "PassOrderError", "TargetError", "TraceError",
    "apply_manifest", "compile", "mappable_nodes", "targets", "trace",
]
