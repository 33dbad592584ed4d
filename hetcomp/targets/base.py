"""What a target backend is, as data. Passes read these fields; none special-cases a target by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hetcomp.errors import TargetError
from hetcomp.targets.cost import CostModel, EnergyTerm

__all__ = ["CostModel", "EnergyTerm", "NoiseModel", "Precision", "Target", "TileGeometry", "WEIGHT_STATIC", "DYNAMIC"]

WEIGHT_STATIC = "weight-static"
DYNAMIC = "dynamic"
OP_KINDS = (WEIGHT_STATIC, DYNAMIC)


@dataclass(frozen=True)
class Precision:
    """Operand precision in bits; None means full floating point."""

    input_bits: int | None
    weight_bits: int | None
    output_bits: int | None


@dataclass(frozen=True)
class NoiseModel:
    """A noise model by kind plus its parameters.

    kind is one of: "none", "pcm" (aihwkit PCM programming/read noise and drift), "adc" (quantization
    only), "reram-thermal-shot" (H3PIMAP Eq. 1), "relative-gaussian" (photonic input noise).
    ``weight_noise_rel`` is the effective Gaussian weight-noise std relative to max|W|, the quantity the
    Hessian passes use to turn curvature into expected loss increase (HILAL's gamma).
    """

    kind: str
    weight_noise_rel: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


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
    noise: NoiseModel
    tile: TileGeometry | None
    clock_hz: float | None
    supports: frozenset[str]
    cost: CostModel
    # Relative accuracy rank: lower is more accurate. Used to order tiers (most accurate first).
    accuracy_rank: int = 0
    lowering: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "+" in self.name or self.name != self.name.strip():
            raise TargetError(f"target name {self.name!r} must be non-empty, without '+' or surrounding spaces")
        unknown = set(self.supports) - set(OP_KINDS)
        if unknown:
            raise TargetError(f"target {self.name!r}: unknown op kinds {sorted(unknown)}; known: {OP_KINDS}")

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
        """The whole definition as JSON-safe data (manifests carry it; ``from_dict`` inverts it)."""
        data = asdict(self)
        data["supports"] = sorted(self.supports)
        data["capacity_weights"] = self.capacity_weights
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        """The target ``to_dict`` described. Raises TargetError naming what is malformed."""
        try:
            cost = dict(data["cost"])
            cost["terms"] = tuple(EnergyTerm(**term) for term in cost.get("terms", ()))
            tile = data.get("tile")
            return cls(
                name=data["name"], description=data.get("description", ""), analog=bool(data["analog"]),
                precision=Precision(**data["precision"]), noise=NoiseModel(**data["noise"]),
                tile=None if tile is None else TileGeometry(**tile), clock_hz=data.get("clock_hz"),
                supports=frozenset(data["supports"]), cost=CostModel(**cost),
                accuracy_rank=int(data.get("accuracy_rank", 0)), lowering=dict(data.get("lowering") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            name = data.get("name") if isinstance(data, dict) else None
            raise TargetError(f"target definition {name!r} is malformed ({type(err).__name__}: {err})") from None
