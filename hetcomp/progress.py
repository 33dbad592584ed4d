"""Progress bars for long steps; silenced globally by ``set_quiet(True)`` (the CLI's --quiet)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
# Quiet when asked, and on every torch.distributed rank but the first (torchrun sets RANK): one set of bars.
_quiet = os.environ.get("HETCOMP_QUIET", "") not in ("", "0") or os.environ.get("RANK", "0") != "0"


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterator[T]:
    """Wrap an iterable in a progress bar (stderr), unless quiet."""
    if _quiet:
        yield from iterable
        return
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs stay readable).
    yield from tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, dynamic_ncols=True,
                    disable=None)


def bar(total: int, desc: str, leave: bool = False):
    """A manual progress bar (``.update(n)``, ``.set_postfix(...)``); a no-op object when quiet."""
    return tqdm(total=total, desc=desc, leave=leave, disable=True if _quiet else None, file=sys.stderr,
                dynamic_ncols=True)
