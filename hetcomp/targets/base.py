"""What a target backend is, as data. Passes read these fields; none special-cases a target by name.

A target is its geometry, precision, supported op kinds and cost model, plus its physics: ``simulator``
names a registered simulator (``hetcomp.lower.Simulator``: the device's noise, how a layer is lowered,
programmed and drifted, and the effective weight noise the Hessian passes use) and ``device`` holds that
simulator's parameters. A target without a simulator runs as the exact digital layer. The physics lives
once, in the simulator; a target only gives its numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hetcomp.errors import TargetError
from hetcomp.graph.layers import DYNAMIC, OP_KINDS, WEIGHT_STATIC
from hetcomp.targets.cost import CostModel, EnergyTerm

__all__ = ["CostModel", "DYNAMIC", "EnergyTerm", "OP_KINDS", "Precision", "Target", "TargetSet", "TileGeometry",
           "WEIGHT_STATIC"]


@dataclass(frozen=True)
class Precision:
    """Operand precision in bits; None means full floating point."""

    input_bits: int | None
    weight_bits: int | None
    output_bits: int | None


@dataclass(frozen=True)
class TileGeometry:
    rows: int  # crossbar rows (inputs)
    cols: int  # crossbar columns (outputs)
    crossbars_per_tile: int = 1
    tiles: int | None = None  # None: as many as needed (capacity unbounded)
    cells_per_weight: int = 1  # bit-sliced weights occupy several cells of a row


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    analog: bool
    precision: Precision
    tile: TileGeometry | None
    clock_hz: float | None
    supports: frozenset[str]
    cost: CostModel
    # Relative accuracy rank: lower is more accurate. Used to order tiers (most accurate first).
    accuracy_rank: int = 0
    simulator: str | None = None  # a registered hetcomp.lower.Simulator; None: the exact digital layer
    device: dict[str, Any] = field(default_factory=dict)  # the simulator's parameters

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "+" in self.name or self.name != self.name.strip():
            raise TargetError(f"target name {self.name!r} must be non-empty, without '+' or surrounding spaces")
        unknown = set(self.supports) - set(OP_KINDS)
        if unknown:
            raise TargetError(f"target {self.name!r}: unknown op kinds {sorted(unknown)}; known: {OP_KINDS}")
        if self.simulator is not None and not isinstance(self.simulator, str):
            raise TargetError(f"target {self.name!r}: simulator must be a registered simulator's name, got "
                              f"{type(self.simulator).__name__}")
        if not isinstance(self.device, dict):
            raise TargetError(f"target {self.name!r}: device must be a dict of the simulator's parameters")
        for field_name in ("input_bits", "weight_bits", "output_bits"):
            bits = getattr(self.precision, field_name)
            if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits < 1):
                raise TargetError(f"target {self.name!r}: precision.{field_name} must be an integer >= 1 or None "
                                  f"(full precision), got {bits!r}")
        if self.tile is not None:
            for field_name in ("rows", "cols", "crossbars_per_tile", "cells_per_weight", "tiles"):
                value = getattr(self.tile, field_name)
                if (value is not None or field_name != "tiles") and (
                        not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise TargetError(f"target {self.name!r}: tile.{field_name} must be an integer >= 1"
                                      f"{' or None (unbounded)' if field_name == 'tiles' else ''}, got {value!r}")
        if self.clock_hz is not None and not (isinstance(self.clock_hz, int | float) and self.clock_hz > 0):
            raise TargetError(f"target {self.name!r}: clock_hz must be a number > 0 or None, got {self.clock_hz!r}")

    def __hash__(self) -> int:  # device is a dict: hash by the identifying fields
        return hash((self.name, self.simulator))

    @property
    def capacity_weights(self) -> int | None:
        """Weights the target can hold (None: unbounded)."""
        if self.tile is None or self.tile.tiles is None:
            return None
        tile = self.tile
        weights_per_crossbar = tile.rows * (tile.cols // tile.cells_per_weight)
        return weights_per_crossbar * tile.crossbars_per_tile * tile.tiles

    def supports_kind(self, kind: str) -> bool:
        return kind in self.supports

    def to_dict(self) -> dict[str, Any]:
        """The whole definition as JSON-safe data (manifests and target files carry it; ``from_dict`` inverts it)."""
        data = asdict(self)
        data["supports"] = sorted(self.supports)
        data["capacity_weights"] = self.capacity_weights
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        """The target ``to_dict`` (or a TOML target file) describes. Raises TargetError naming what is malformed."""
        try:
            cost = dict(data.get("cost") or {})
            cost["terms"] = tuple(EnergyTerm(**term) for term in cost.get("terms", ()))
            tile = data.get("tile")
            return cls(
                name=data["name"], description=data.get("description", ""), analog=bool(data["analog"]),
                precision=Precision(**{"input_bits": None, "weight_bits": None, "output_bits": None,
                                       **(data.get("precision") or {})}),
                tile=None if tile is None else TileGeometry(**tile), clock_hz=data.get("clock_hz"),
                supports=frozenset(data["supports"]), cost=CostModel(**cost),
                accuracy_rank=int(data.get("accuracy_rank", 0)), simulator=data.get("simulator"),
                device=dict(data.get("device") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            name = data.get("name") if isinstance(data, dict) else None
            problem = f"missing {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
            raise TargetError(f"target definition {name!r} is malformed ({problem})") from None


@dataclass(frozen=True)
class TargetSet:
    """An unordered set of targets, kept in a canonical order: most accurate first, then by name."""

    targets: tuple[Target, ...]

    @classmethod
    def of(cls, targets: Sequence[Target]) -> TargetSet:
        """A set of these targets in canonical order (most accurate first, then by name)."""
        return cls(tuple(sorted(targets, key=lambda t: (t.accuracy_rank, t.name))))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def __str__(self) -> str:
        return "+".join(self.names)

    def __iter__(self) -> Iterator[Target]:
        return iter(self.targets)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> Target:
        for target in self.targets:
            if target.name == name:
                return target
        raise TargetError(f"target {name!r} is not in the target set {self}")

    @property
    def analog(self) -> list[Target]:
        return [t for t in self.targets if t.analog]

    @property
    def digital(self) -> list[Target]:
        return [t for t in self.targets if not t.analog]

    def supporting(self, kind: str) -> list[Target]:
        """Targets that can run an op kind, most accurate first."""
        return [t for t in self.targets if t.supports_kind(kind)]
