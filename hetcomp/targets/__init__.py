"""Target registry and target-set parsing.

Built-in targets live one per file in this package; ``register`` adds a user's own.
A target set is written as a ``+``-joined string (``"pcm+digital"``); order does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetcomp.errors import TargetError
from hetcomp.targets import digital, pcm, photonic, reram, sram
from hetcomp.targets.base import (
    DYNAMIC,
    OP_KINDS,
    WEIGHT_STATIC,
    CostModel,
    NoiseModel,
    Precision,
    Target,
    TileGeometry,
)

__all__ = [
    "DYNAMIC", "OP_KINDS", "WEIGHT_STATIC", "CostModel", "NoiseModel", "Precision", "Target",
    "TileGeometry", "TargetSet", "register", "get", "available", "parse",
]

_REGISTRY: dict[str, Target] = {}


def register(target: Target, *, overwrite: bool = False) -> Target:
    """Add a target to the registry so target strings can name it."""
    if not isinstance(target, Target):
        raise TargetError(f"register() takes a hetcomp.targets.Target, got {type(target).__name__}")
    if target.name in _REGISTRY and not overwrite:
        raise TargetError(f"target {target.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[target.name] = target
    return target


def get(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(available())}") from None


def available() -> list[str]:
    return sorted(_REGISTRY)


for _module in (digital, pcm, sram, reram, photonic):
    register(_module.TARGET)


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

    def __iter__(self):
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


def parse(spec: str | TargetSet | Target | list[str] | tuple[str, ...]) -> TargetSet:
    """Parse ``"pcm+digital"`` (or a list of names) into a TargetSet.

    Errors: empty string or empty component, duplicate names, unknown names (the message lists the
    known ones).
    """
    if isinstance(spec, TargetSet):
        return spec
    if isinstance(spec, Target):
        return TargetSet((spec,))
    if isinstance(spec, str):
        if not spec.strip():
            raise TargetError("empty target string; write targets joined by '+', e.g. 'pcm+digital'")
        names = [part.strip() for part in spec.split("+")]
    elif isinstance(spec, list | tuple):
        names = [str(part).strip() for part in spec]
    else:
        raise TargetError(f"target must be a string like 'pcm+digital', got {type(spec).__name__}")
    if not names or any(not n for n in names):
        raise TargetError(f"empty target name in {spec!r}; write targets joined by '+', e.g. 'pcm+digital'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TargetError(f"duplicate target(s) {', '.join(duplicates)} in {spec!r}; name each target once")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise TargetError(
            f"unknown target(s) {', '.join(map(repr, unknown))}; known targets: {', '.join(available())}"
            " (add your own with hetcomp.targets.register)"
        )
    return TargetSet.of([_REGISTRY[n] for n in names])
