"""torch.distributed scaling of the Hessian passes and of evaluation (issue #16): run under torchrun with 1 and
with N processes and compare.

    torchrun --nproc-per-node 1 bench/scale.py     # then --nproc-per-node 2

ResNet-20 on digits-as-CIFAR (seeded initialisation), hilal on pcm+digital with the Hessian over ``--batches``
calibration batches of 128, then ``--repeats`` hardware repeats on the test split. Rank 0 prints one JSON line:
world size, Hessian seconds, evaluation seconds, peak memory per rank (CUDA allocated, max over ranks), the
partition and the first repeats' accuracies (equal for every world size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hetcomp  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    set_quiet(True)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    from resnet20 import ResNet20, digits_as_cifar

    splits = digits_as_cifar()
    torch.manual_seed(0)
    model = ResNet20().to(device)
    train = [(x.to(device), y.to(device)) for x, y in
             list(splits.loader("train", batch_size=128, shuffle=False))[: args.batches]]
    test = splits.test.tensors
    test = (test[0].to(device), test[1].to(device))
    hetcomp.compile(model, "pcm+digital", data=train[:1], hessian={"batches": 1, "max_iter": 2, "probes": 1})  # warm
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    compiled = hetcomp.compile(model, "pcm+digital", data=train, hessian={"batches": args.batches})
    if cuda:
        torch.cuda.synchronize()
    hessian_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    dist.barrier()
    start = time.perf_counter()
    result = compiled.evaluate(test, repeats=args.repeats, seed=1)
    evaluate_s = time.perf_counter() - start
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    if dist.get_rank() == 0:
        print(json.dumps({
            "world": dist.get_world_size(), "device": torch.cuda.get_device_name() if cuda else "cpu",
            "hessian_s": round(hessian_s, 3), "evaluate_s": round(evaluate_s, 3),
            "peak_gib_per_rank": [round(p / 2**30, 3) for p in peaks],
            "pcm_layers": sum(layer["assignment"] == "pcm" for layer in compiled.manifest.layers),
            "accuracies": [round(a, 4) for a in result.accuracies[:5]],
            "traces": [round(layer["metrics"]["hessian_trace"], 5) for layer in compiled.manifest.layers[:3]],
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
