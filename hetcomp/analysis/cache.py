"""The analysis cache: expensive analyses (gradient graphs, Hessian estimates, Krylov bases) computed once per
compile and shared by passes, under typed keys, invalidated by what a pass says it changes (MLIR's analysis
manager and preserved analyses)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from hetcomp.errors import ConfigError

# What a pass can change that analyses depend on (``Pass.changes``, ``AnalysisKey.depends_on``).
GRAPH = "graph"
WEIGHTS = "weights"


@dataclass(frozen=True)
class AnalysisKey:
    """A typed cache key: subclass as a frozen dataclass of the analysis's settings and say what it depends
    on. Keys are per compile context (one graph), so no key carries the graph's identity."""

    depends_on: ClassVar[frozenset[str]] = frozenset({GRAPH, WEIGHTS})


class AnalysisCache:
    """Expensive analyses computed once and shared by passes (MLIR's analysis manager): ``get(key, compute)``;
    ``invalidate(changes)`` drops the entries whose key depends on what a pass changed."""

    def __init__(self) -> None:
        self._entries: dict[AnalysisKey, Any] = {}

    def get(self, key: AnalysisKey, compute: Callable[[], Any]) -> Any:
        if not isinstance(key, AnalysisKey):
            raise ConfigError(f"analysis keys are hetcomp.analysis.cache.AnalysisKey dataclasses (typed, per "
                              f"analysis), got {type(key).__name__}")
        if key not in self._entries:
            self._entries[key] = compute()
        return self._entries[key]

    def __contains__(self, key: AnalysisKey) -> bool:
        return key in self._entries

    def drop(self, key: AnalysisKey) -> None:
        self._entries.pop(key, None)

    def invalidate(self, changes: Iterable[str] | None = None) -> None:
        """Drop what depends on ``changes`` (None: everything)."""
        if changes is None:
            self._entries.clear()
            return
        changed = set(changes)
        for key in [k for k in self._entries if k.depends_on & changed]:
            del self._entries[key]

__all__ = ["GRAPH", "WEIGHTS", "AnalysisCache", "AnalysisKey"]
