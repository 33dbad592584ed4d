"""torch.distributed, the one switch: when a default process group is initialized, hetcomp shards its work
(the Hessian passes' batches, evaluation's repeats) and only rank 0 writes files and prints; otherwise nothing
changes. ``init()`` starts the group from torchrun's environment, so the same script (or ``torchrun
--nproc-per-node N -m hetcomp compile ...``) runs on one process or many.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def group() -> Any:
    """The default process group, or None in a single process."""
    return dist.group.WORLD if active() else None


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def init(backend: str | None = None) -> bool:
    """Start the default process group from torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...): NCCL
    when there is a GPU for every local rank (each rank on GPU LOCAL_RANK), else gloo. Returns whether a group
    is active; a no-op in a single process or when a group is already initialized."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and local_rank < torch.cuda.device_count()  # a GPU per rank, else gloo
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return True
