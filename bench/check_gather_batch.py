"""hetcomp.distributed.gather_batch over NCCL: an in-batch loss's data-parallel gradient against one process's.

    torchrun --nproc-per-node 2 bench/check_gather_batch.py      # NCCL on GPUs (gloo on the CPU)

MiniLM's InfoNCE (``hetcomp.zoo.docstrings.info_nce``) scores each query against every document of the batch; in a
data-parallel LAFT step each rank holds a slice and ``gather_batch`` gathers the documents over the ranks, with
autograd (an all-gather forward, an all-reduce backward). CI tests it on gloo; this checks it on the GPUs: a
Linear encoder under DistributedDataParallel on uneven slices (the stage's weights) must give the gradient one
process computes on the whole batch, and slice-local negatives must not. Prints the differences; exits non-zero on
a mismatch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from hetcomp import distributed
from hetcomp.zoo.docstrings import info_nce


def gradient(device: torch.device, sizes: list[int] | None, sliced: bool = True) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Linear(48, 64).to(device)
    pairs = sum(sizes) if sizes else 203
    queries = torch.randn(pairs, 16, 48, device=device)
    documents = queries + 0.5 * torch.randn(pairs, 16, 48, device=device)
    weight = 1.0
    if sizes is not None:
        rank = distributed.rank()
        start = sum(sizes[:rank])
        queries, documents = queries[start : start + sizes[rank]], documents[start : start + sizes[rank]]
        weight = len(sizes) * sizes[rank] / pairs
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    inputs = torch.cat([queries, documents])
    with distributed.sliced_batch(sliced):
        loss = info_nce(model(inputs), {"attention_mask": torch.ones(inputs.shape[:2], device=device)})
    (loss * weight).backward()
    module = model.module if sizes is not None else model
    return torch.cat([module.weight.grad.flatten(), module.bias.grad.flatten()])


def main() -> None:
    distributed.init()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    world = distributed.world_size()
    sizes = [203 // world + (1 if r < 203 % world else 0) for r in range(world)]  # uneven slices
    gathered, local = gradient(device, sizes), gradient(device, sizes, sliced=False)
    single = gradient(device, None, sliced=False)  # one process's computation on the whole batch
    scale = float(single.abs().max())
    difference = float((gathered - single).abs().max())
    local_difference = float((local - single).abs().max())
    ok = difference <= 1e-4 * scale and local_difference > 1e-3 * scale
    if distributed.is_main():
        print(f"{world} ranks, slices {sizes}: gathered negatives max |diff| {difference:.2e}, slice-local negatives "
              f"{local_difference:.2e} (gradient scale {scale:.2e}) {'ok' if ok else 'MISMATCH'}")
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
