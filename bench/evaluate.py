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


def digits_workload(device: str, images: int, epochs: int = 0):
    from digits_cnn import build

    model, data = build()
    inputs, labels = (torch.cat(parts) for parts in zip(*data["test"]))
    return "digits CNN", model, data["train"], _tiled(inputs, labels, images)


def resnet20_workload(device: str, images: int, epochs: int = 0):
    """ResNet-20 on CIFAR-shaped inputs (digits upsampled to 3x32x32, tiled to ``images``). ``epochs`` > 0: trained
    on the digits train split (on ``device``); 0: seeded init with BatchNorm statistics of the data and the FP
    model's answers as labels (timing does not depend on them)."""
    from resnet20 import ResNet20, digits_as_cifar

    from hetcomp.training import train

    splits = digits_as_cifar()
    torch.manual_seed(0)
    model = ResNet20()
    inputs, train_labels = splits.train.tensors
    test, labels = splits.test.tensors
    if epochs:
        model = train(model.to(device), DataLoader(splits.train, batch_size=128, shuffle=True,
                                                   generator=torch.Generator().manual_seed(0)), epochs=epochs)
        model = model.cpu().eval()
    else:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        with torch.no_grad():
            model(inputs[:512])
            model.eval()
            labels = model(test).argmax(-1)
            train_labels = model(inputs).argmax(-1)
    calibration = DataLoader(TensorDataset(inputs[:256], train_labels[:256]), batch_size=64)
    return "ResNet-20", model, calibration, _tiled(test, labels, images)


def _tiled(inputs: torch.Tensor, labels: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    copies = -(-images // len(labels))
    return inputs.repeat(copies, *[1] * (inputs.dim() - 1))[:images], labels.repeat(copies)[:images]


WORKLOADS = {"digits": digits_workload, "resnet20": resnet20_workload}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(trials: int, device: str, run, *args, **kwargs):
    times, result = [], None
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        result = run(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def _digital_passes(model: torch.nn.Module, inputs: torch.Tensor, batch: int, repeats: int) -> None:
    """``repeats`` passes of the FP model over the staged inputs (no DataLoader: the floor)."""
    for _ in range(repeats):
        for start in range(0, len(inputs), batch):
            model(inputs[start : start + batch])


def _z(a, b) -> float:
    """Difference of the mean accuracies in combined standard errors (the tests require < 2)."""
    se = (a.std**2 / len(a.accuracies) + b.std**2 / len(b.accuracies)) ** 0.5
    return abs(a.mean - b.mean) / se if se > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet20"], choices=sorted(WORKLOADS))
    parser.add_argument("--strategies", nargs="+", default=["all-analog", "hilal"])
    parser.add_argument("--images", type=int, default=1000, help="test images (tiled from the test split)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=1, help="timings are the best of this many")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="train ResNet-20 this many epochs first (0: seeded init, labels = its own answers)")
    parser.add_argument("--skip-plain", action="store_true", help="do not time the plain loop (slow on CPU)")
    args = parser.parse_args()
    set_quiet(True)
    device = args.device
    print(f"{args.repeats} repeats at t = 1 day, {args.images} images, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}")
    header = (f"{'model':11s} {'strategy':11s} {'digital s':>9s} {'plain s':>8s} {'tiles s':>8s} {'vector s':>8s} "
              f"{'vec/digital':>11s} {'plain/vec':>9s} {'tiles/vec':>9s} {'acc tiles':>15s} {'acc vec':>15s} "
              f"{'z':>5s} {'peak GiB':>8s}")
    print(header)
    for name in args.models:
        title, model, calibration, (inputs, labels) = WORKLOADS[name](device, args.images, args.train_epochs)
        model = model.to(device)
        inputs, labels = inputs.to(device), labels.to(device)
        batch = 4096 if device == "cuda" else 128
        loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch)
        with torch.no_grad():
            _digital_passes(model, inputs, batch, 1)  # warm-up (kernel selection)
            digital_s, _ = _best(args.trials, device, _digital_passes, model, inputs, batch, args.repeats)
        for strategy in args.strategies:
            data = calibration if strategy != "all-analog" else None
            compiled = hetcomp.compile(model, "pcm+digital", (inputs[:4],), data=data, strategy=strategy,
                                       hessian={"batches": 2} if data is not None else None)
            module, report = compiled.module, compiled.lowering
            plain_s, plain = (float("nan"), [float("nan")]) if args.skip_plain else _best(
                args.trials, device, plain_loop_accuracy, module, report, loader, args.repeats, 86400.0)
            tiles_s, tiles = _best(args.trials, device, evaluate, module, report, (inputs, labels),
                                   repeats=args.repeats, exact_tiles=True)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            vector_s, vector = _best(args.trials, device, evaluate, module, report, (inputs, labels),
                                     repeats=args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            print(f"{title:11s} {strategy:11s} {digital_s:9.2f} {plain_s:8.2f} {tiles_s:8.2f} {vector_s:8.2f} "
                  f"{vector_s / digital_s:10.1f}x {plain_s / vector_s:8.2f}x {tiles_s / vector_s:8.2f}x "
                  f"{tiles.mean:7.4f}±{tiles.std:.4f} {vector.mean:7.4f}±{vector.std:.4f} {_z(tiles, vector):5.2f} "
                  f"{peak:8.2f}   [{vector.method}; plain loop acc "
                  f"{statistics.fmean(plain):.4f}]", flush=True)
    print("vec/digital: vectorized evaluation time over the time of the same number of digital passes (lower is "
          "better); plain/vec and tiles/vec: speed-ups of the vectorized evaluator. Accuracies agree in distribution "
          "(tests/test_repeats.py), not draw for draw; z: their difference in combined standard errors.")


if __name__ == "__main__":
    main()
