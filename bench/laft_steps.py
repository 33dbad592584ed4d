"""Where a LAFT stage's time goes, per world size: lowering, validation and the training steps (ms per step).

    torchrun --nproc-per-node 1 bench/laft_steps.py --configs 32x128,32x256          # steps x global batch
    torchrun --nproc-per-node 2 bench/laft_steps.py --configs 32x256
    torchrun --nproc-per-node 2 bench/laft_steps.py --configs 32x256 --diagnose no-ddp

The stage is bench/scale.py's (ResNet-20 or the digits transformer, every PCM layer of the hilal partition
lowered, ``out_noise=0``, validation with 4 repeats programmed and drifted). Rank 0 prints one JSON line per
config. Comparing one GPU at batch B/2 with two GPUs at batch B tells whether a step is bound by the host (its
time hardly depends on the batch: a second GPU cannot help) and what the data-parallel collectives cost.

``--diagnose`` (comma-separated: the variants alternate in one process, ``--rounds`` times, so that they see the
same machine state) takes a part of data parallelism away to measure what it costs (not a way to train: the ranks
then train apart): ``no-ddp`` leaves the model unwrapped (no gradient all-reduce, each rank steps on its own slice),
``no-syncbn`` keeps BatchNorm per rank, ``torch-syncbn`` uses torch's SyncBatchNorm (whose forward synchronizes the
host once per layer) instead of hetcomp's GlobalBatchNorm, ``no-bm`` trains without aihwkit's bound management (no
reruns of clipping tiles, no host synchronization per layer: not aihwkit's forward, a measure of what that costs);
``default`` is the stage as it is; ``+`` combines (``no-bm+no-syncbn``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import scale  # noqa: E402

import hetcomp  # noqa: E402
from hetcomp import distributed  # noqa: E402
from hetcomp.finetune import stage  # noqa: E402
from hetcomp.lower import aihwkit_train  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402

PARTS = ("lower_graph", "_validate", "_data_parallel", "digital_state_dict")


def timing(seconds: dict[str, float], cuda: bool) -> None:
    """Time the stage's parts (``PARTS``, functions of hetcomp.finetune.stage) into ``seconds``."""
    def timed(real: Callable, name: str) -> Callable:
        @functools.wraps(real)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = real(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            return result
        return wrapper

    for name in PARTS:
        setattr(stage, name, timed(getattr(stage, name), name))


@contextlib.contextmanager
def profiled(folder: Path | None, name: str, cuda: bool) -> Iterator[None]:
    """Profile the block into ``folder / name`` (operators by self CPU time; the time in cudaStreamSynchronize and
    aten::nonzero is the host waiting for the GPU), or do nothing without a folder."""
    if folder is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        yield
    folder.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    (folder / name).write_text(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="resnet20", choices=scale.MODELS)
    parser.add_argument("--configs", default="32x128,32x256", help="comma-separated STEPSxBATCH (global batch)")
    parser.add_argument("--diagnose", default="default",
                        help="comma-separated, of default, no-ddp, no-syncbn, torch-syncbn: each config runs under "
                             "each, one after the other in this process")
    parser.add_argument("--rounds", type=int, default=1, help="run all configs and variants this many times")
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile each config's stage (torch.profiler, CPU and CUDA): every rank writes its "
                             "operator table, by self CPU time, to PROFILE/rank<r>_<steps>x<batch>.txt")
    args = parser.parse_args()
    configs = [tuple(map(int, config.split("x"))) for config in args.configs.split(",")]
    variants = [variant.strip() for variant in args.diagnose.split(",")]
    unknown = {part for variant in variants for part in variant.split("+")} - {
        "default", "no-ddp", "no-syncbn", "torch-syncbn", "no-bm"}
    if unknown:
        parser.error(f"unknown --diagnose {sorted(unknown)}")
    set_quiet(True)
    cuda = torch.cuda.is_available()
    seconds: dict[str, float] = {}
    timing(seconds, cuda)
    distributed.init()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, splits = scale.model_and_data(args.model, False)
    inputs, labels = splits["train"].tensors
    calibration = [(inputs[i : i + 128].to(device), labels[i : i + 128].to(device)) for i in range(0, 1024, 128)]
    compiled = hetcomp.compile(model.to(device), "pcm+digital", data=calibration, hessian={"batches": 8})
    scale.laft_stage(compiled, splits, device, scale.parse(["--laft-steps", "4"]), 256)  # warm-up
    data_parallel, batchnorm, bound_managed = stage._data_parallel, stage._batchnorm, aihwkit_train._bound_managed
    for _, (steps, batch), variant in itertools.product(range(args.rounds), configs, variants):
        parts = set(variant.split("+"))
        stage._data_parallel, stage._batchnorm = data_parallel, batchnorm
        aihwkit_train._bound_managed = bound_managed
        if "no-ddp" in parts:
            stage._data_parallel = lambda lowered, *_: lowered
        if "no-syncbn" in parts:
            stage._batchnorm = lambda lowered, *_: lowered
        if "torch-syncbn" in parts:  # torch's SyncBatchNorm in place of hetcomp's GlobalBatchNorm
            stage._batchnorm = lambda lowered, *_: torch.nn.SyncBatchNorm.convert_sync_batchnorm(lowered)
        if "no-bm" in parts:  # the training forward without bound management's reruns and host synchronization
            aihwkit_train._bound_managed = lambda x, weights, nm, io, valid_out, out, passed: out
        seconds.clear()
        with profiled(args.profile, f"rank{distributed.rank()}_{variant}_{steps}x{batch}.txt", cuda):
            total, _ = scale.laft_stage(compiled, splits, device, scale.parse(["--laft-steps", str(steps)]), batch)
        parts = {name: round(value, 3) for name, value in seconds.items()}
        training = total - sum(seconds.values())
        if distributed.is_main():
            print(json.dumps({"model": args.model, "world": distributed.world_size(), "diagnose": variant,
                              "steps": steps, "batch": batch, "stage_s": round(total, 3),
                              "per_step_ms": round(1000 * training / steps, 1), **parts}), flush=True)
    if distributed.active():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
