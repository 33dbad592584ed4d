"""Registries of named extensions: targets, simulators, strategies, annotation pipelines.

One generic ``Registry`` serves them all (duplicate names refused unless ``overwrite=True``; an unknown
name lists the known ones). The built-in entries are registered in one place, ``hetcomp.builtins``, loaded
on the first lookup, so importing the core (graph, pass manager, manifest, compile's driver) loads no
concrete pass, target or strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from hetcomp.errors import HetcompError

T = TypeVar("T")

_builtins_loaded = False


def load_builtins() -> None:
    """Register hetcomp's built-in targets, simulators, strategies and pipelines (once)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # set first: registering may look things up
        try:
            from hetcomp import builtins

            builtins.register_all()
        except BaseException:
            _builtins_loaded = False  # the next lookup tries again and shows the real cause
            raise


class Registry(Generic[T]):
    """Name -> entry. ``kind`` names what is registered (for messages); ``error`` is the class raised;
    ``hint`` says how to add one."""

    def __init__(self, kind: str, error: type[HetcompError], hint: str,
                 check: Callable[[object], bool] | None = None) -> None:
        self.kind, self.error, self.hint, self.check = kind, error, hint, check
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        if self.check is not None and not self.check(entry):
            raise self.error(f"cannot register {type(entry).__name__} as a {self.kind}; {self.hint}")
        if not isinstance(name, str) or not name:
            raise self.error(f"a {self.kind} needs a non-empty name, got {name!r}")
        load_builtins()  # a user entry may not silently shadow a built-in registered later
        if name in self._entries and not overwrite:
            raise self.error(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error if absent): for tests and for replacing an entry in an interactive session."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        load_builtins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())} ({self.hint})") from None

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_builtins()
        return name in self._entries
