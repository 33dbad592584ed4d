"""Targets: what a backend is (``base``: data), the registry and target-set parsing (``registry``), and the
built-in targets, one declarative file each (digital, pcm, sram, reram, photonic; registered by
``hetcomp.builtins`` on first lookup). Importing this package loads no built-in target.
"""

from hetcomp.targets.base import (
    DYNAMIC,
    OP_KINDS,
    WEIGHT_STATIC,
    CostModel,
    EnergyTerm,
    Precision,
    Target,
    TargetSet,
    TileGeometry,
)
from hetcomp.targets.registry import available, get, load_file, parse, register

__all__ = [
    "DYNAMIC", "OP_KINDS", "WEIGHT_STATIC", "CostModel", "EnergyTerm", "Precision", "Target", "TargetSet",
    "TileGeometry", "available", "get", "load_file", "parse", "register",
]
