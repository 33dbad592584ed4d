"""Peak memory a block of work added, for pass records and benches.

``bytes`` is the peak during the block minus what was in use when it started: what the block itself needed
at its worst. On CUDA: ``torch.cuda.memory_allocated`` (tensors only; peak reset per block). On CPU (Linux):
the process's resident set size (peak ``VmHWM``, reset per block through ``/proc/self/clear_refs``, minus
``VmRSS`` at the start); it counts everything the process touched, so it bounds what the block needs from
above. Where neither is available it is None.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (None where unmeasurable), ``peak.kind``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kind = "cuda-allocated" if self.device.type == "cuda" else "rss"
        self.bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda-allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = int(torch.cuda.memory_allocated(self.device))
        else:
            _reset_rss_peak()
            self._start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda-allocated":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            peak = _status_bytes("VmHWM")
        self.bytes = None if peak is None or self._start is None else max(peak - self._start, 0)
