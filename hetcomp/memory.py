"""Peak memory of a block of work, for pass records and benches.

On CUDA: the peak of ``torch.cuda.memory_allocated`` (tensors only, reset per block). On CPU (Linux): the
process's peak resident set size (``VmHWM``), reset per block through ``/proc/self/clear_refs``; it counts
everything the process holds (Python, libraries, data), so it is an upper bound on what the block needs.
Where neither is available the peak is None.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def _rss_peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
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

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda-allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_rss_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda-allocated":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = _rss_peak_bytes()
