"""What the accurate default Hessian estimator costs, and what it buys (issue #13, item 2).

For the demo digits CNN (trained, as ``make demo`` uses it) and ResNet-20 on digits-as-CIFAR (seeded
initialisation, not trained), ``hetcomp.compile(..., target="pcm+digital")`` (hilal) for seeds 0-4 with:

- default: per-layer (block) probes deflated by the Lanczos Krylov bases, 10 probes, 2 batches;
- former default: one full-model HVP per probe, 10 probes, no deflation.

Prints per seed the compile time, the PCM MAC ratio and the split, then the number of distinct splits and
the time ratio. The default's price is the time ratio; its gain, one split for every seed.

    python bench/compile_cost.py [--device cuda] [--models digits,resnet20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hetcomp  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402

ESTIMATORS = {"default (block+deflate)": {}, "former (full, no deflation)": {"estimator": "full", "deflate": False}}


def digits_cnn(device: torch.device):
    from digits_cnn import build

    model, data = build()
    return model.to(device), [(x.to(device), y.to(device)) for x, y in list(data["train"])[:2]]


def resnet20(device: torch.device):
    from resnet20 import ResNet20, digits_as_cifar

    splits = digits_as_cifar()
    torch.manual_seed(0)
    loader = splits.loader("train", batch_size=128, shuffle=False)
    return ResNet20().to(device), [(x.to(device), y.to(device)) for x, y in list(loader)[:2]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="digits,resnet20")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    set_quiet(True)
    device = torch.device(args.device)
    builders = {"digits": ("digits CNN (trained)", digits_cnn), "resnet20": ("ResNet-20 (seeded init)", resnet20)}
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for key in args.models.split(","):
        title, build = builders[key]
        model, batches = build(device)
        hetcomp.compile(model, "pcm+digital", data=batches, seed=0, hessian={"max_iter": 2, "probes": 1})  # warm-up
        print(f"\n{title}: hilal on pcm+digital, calibration 2 batches of {len(batches[0][0])}")
        times = {}
        for label, settings in ESTIMATORS.items():
            splits, seconds = [], []
            for seed in range(args.seeds):
                sync(device)
                start = time.perf_counter()
                compiled = hetcomp.compile(model, "pcm+digital", data=batches, seed=seed, hessian=settings)
                sync(device)
                seconds.append(time.perf_counter() - start)
                on_pcm = tuple(layer["name"] for layer in compiled.manifest.layers if layer["assignment"] == "pcm")
                splits.append(on_pcm)
                ratio = compiled.manifest.summary["mac_ratio"]["pcm"]
                print(f"  {label:28s} seed {seed}: {seconds[-1]:6.2f} s  PCM MAC ratio {ratio:.3f}  "
                      f"{len(on_pcm)} layers on pcm")
            times[label] = statistics.median(seconds)
            print(f"  {label:28s} distinct splits over {args.seeds} seeds: {len(set(splits))}; median "
                  f"{times[label]:.2f} s")
        default, former = times.values()
        print(f"  default / former compile time: {default / former:.2f}x")


if __name__ == "__main__":
    main()
