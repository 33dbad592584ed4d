"""Hardware repeats: hetcomp's repeat-vectorized evaluator vs the tile path and the plain loop, against digital passes.

For each model and strategy, the same number of independent repeats (re-program + drift to one day each) on the
same lowered model:

- ``digital``: the FP model, ``repeats`` passes over the data (the floor the headline ratio is taken against);
- ``plain loop``: program, drift, iterate the DataLoader, one repeat at a time (what a user writes first);
- ``tiles``: ``evaluate(..., exact_tiles=True)``, aihwkit's tiles one repeat at a time (digital prefix cached);
- ``vectorized``: ``evaluate(...)``, all repeats per pass (hetcomp.lower.repeats).

Prints wall times (best of ``--trials``), the headline ratio vectorized / digital, the speed-ups over the plain loop
and the tile path, mean accuracies (equal in distribution, not draw for draw) and the peak memory (CUDA: the
allocator's peak during the vectorized run; CPU: the working-set bound ``fold_bytes``).

    python bench/evaluate.py [--models digits resnet20] [--images 1000] [--repeats 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hetcomp  # noqa: E402
from hetcomp.evaluate import evaluate, plain_loop_accuracy  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402


def digits_workload(device: str, images: int):
    from digits_cnn import build

    model, data = build()
    inputs, labels = (torch.cat(parts) for parts in zip(*data["test"]))
    return "digits CNN", model, data["train"], _tiled(inputs, labels, images)


def resnet20_workload(device: str, images: int):
    """ResNet-20 on CIFAR-shaped inputs (digits upsampled to 3x32x32, tiled to ``images``), seeded init with
    BatchNorm statistics of the data; labels are the FP model's answers (timing does not depend on them)."""
    from resnet20 import ResNet20, digits_as_cifar

    splits = digits_as_cifar()
    torch.manual_seed(0)
    model = ResNet20()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    inputs = splits.train.tensors[0]
    with torch.no_grad():
        model(inputs[:512])
    model.eval()
    test = splits.test.tensors[0]
    with torch.no_grad():
        labels = model(test).argmax(-1)
    calibration = DataLoader(TensorDataset(inputs[:256], model(inputs[:256]).argmax(-1).detach()), batch_size=64)
    return "ResNet-20", model, calibration, _tiled(test, labels, images)


def _tiled(inputs: torch.Tensor, labels: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    copies = -(-images // len(labels))
    return inputs.repeat(copies, *[1] * (inputs.dim() - 1))[:images], labels.repeat(copies)[:images]


WORKLOADS = {"digits": digits_workload, "resnet20": resnet20_workload}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(trials: int, device: str, run):
    times, result = [], None
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        result = run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet20"], choices=sorted(WORKLOADS))
    parser.add_argument("--strategies", nargs="+", default=["all-analog", "hilal"])
    parser.add_argument("--images", type=int, default=1000, help="test images (tiled from the test split)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=1, help="timings are the best of this many")
    parser.add_argument("--skip-plain", action="store_true", help="do not time the plain loop (slow on CPU)")
    args = parser.parse_args()
    set_quiet(True)
    device = args.device
    print(f"{args.repeats} repeats at t = 1 day, {args.images} images, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    header = (f"{'model':11s} {'strategy':11s} {'digital s':>9s} {'plain s':>8s} {'tiles s':>8s} {'vector s':>8s} "
              f"{'vec/digital':>11s} {'plain/vec':>9s} {'tiles/vec':>9s} {'acc tiles':>9s} {'acc vec':>8s} "
              f"{'peak GiB':>8s}")
    print(header)
    for name in args.models:
        title, model, calibration, (inputs, labels) = WORKLOADS[name](device, args.images)
        model = model.to(device)
        inputs, labels = inputs.to(device), labels.to(device)
        batch = 4096 if device == "cuda" else 128
        loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch)
        with torch.no_grad():
            digital_s, _ = _best(args.trials, device, lambda: [model(x) for _ in range(args.repeats)
                                                                for x, _ in loader])
        for strategy in args.strategies:
            data = calibration if strategy != "all-analog" else None
            compiled = hetcomp.compile(model, "pcm+digital", (inputs[:4],), data=data, strategy=strategy,
                                       hessian={"batches": 2} if data is not None else None)
            module, report = compiled.module, compiled.lowering
            plain_s, plain = (float("nan"), [float("nan")]) if args.skip_plain else _best(
                args.trials, device, lambda: plain_loop_accuracy(module, report, loader, args.repeats, 86400.0))
            tiles_s, tiles = _best(args.trials, device, lambda: evaluate(
                module, report, (inputs, labels), repeats=args.repeats, exact_tiles=True))
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            vector_s, vector = _best(args.trials, device, lambda: evaluate(
                module, report, (inputs, labels), repeats=args.repeats))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            print(f"{title:11s} {strategy:11s} {digital_s:9.2f} {plain_s:8.2f} {tiles_s:8.2f} {vector_s:8.2f} "
                  f"{vector_s / digital_s:10.1f}x {plain_s / vector_s:8.2f}x {tiles_s / vector_s:8.2f}x "
                  f"{tiles.mean:9.4f} {vector.mean:8.4f} {peak:8.2f}   [{vector.method}; plain loop acc "
                  f"{statistics.fmean(plain):.4f}]", flush=True)
    print("vec/digital: vectorized evaluation time over the time of the same number of digital passes (lower is "
          "better); plain/vec and tiles/vec: speed-ups of the vectorized evaluator. Accuracies agree in distribution "
          "(tests/test_repeats.py), not draw for draw.")


if __name__ == "__main__":
    main()
