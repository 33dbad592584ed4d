"""Peak memory of the Hessian passes and of evaluation, against the model and data sizes (issue #13, item 7).

- Hessian passes: an MLP of about ``--params`` parameters (4 square layers), default compile settings,
  2 calibration batches of 128; prints each pass's peak (CUDA allocated bytes, or the process's peak RSS
  on CPU, reset per pass: hetcomp.memory.PeakMemory) as a multiple of the model's size.
- Evaluation: a conv net lowered to PCM over ``--images`` synthetic 3x32x32 images, staged (default), with
  a small prefix cache, and streamed (``stage_bytes=0``); each in a fresh process, the peak the call added
  as a multiple of the test set's size.

    python bench/memory.py [--params 50e6] [--images 20000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn as nn

import hetcomp
from hetcomp.memory import PeakMemory
from hetcomp.progress import set_quiet


def mlp(params: float) -> nn.Module:
    width = int(math.sqrt(params / 4))
    layers = []
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


def hessian(params: float, device: torch.device) -> None:
    torch.manual_seed(0)
    model = mlp(params).to(device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    width = model[0].in_features
    x = torch.randn(256, width, device=device)
    y = torch.randint(0, width, (256,), device=device)
    loader = [(x[:128], y[:128]), (x[128:], y[128:])]
    start = time.perf_counter()
    compiled = hetcomp.compile(model, "pcm+digital", data=loader, strategy="hni-only")
    print(f"\nHessian passes: MLP {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({size / 2**20:.0f} MiB), default settings, {time.perf_counter() - start:.1f} s")
    print(f"{'pass':20s} {'seconds':>8s} {'peak':>10s} {'x model':>8s}  ({compiled.manifest.passes[0]['memory_kind']})")
    for record in compiled.manifest.passes:
        peak = record["peak_bytes"] or 0
        print(f"{record['name']:20s} {record['seconds']:8.2f} {peak / 2**20:8.0f} MiB {peak / size:8.1f}")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


EVALUATION_MODES = {
    "staged, prefix cache 1 GiB": {},
    "staged, prefix cache 64 MiB": {"prefix_cache_bytes": 64 << 20},
    "streamed (stage_bytes=0)": {"stage_bytes": 0},
}


def evaluation_peak(images: int, device: torch.device, mode: str) -> tuple[float, int, int]:
    """(seconds, peak bytes the evaluate call added, test set bytes) of one mode, in this (fresh) process."""
    torch.manual_seed(0)
    model = ConvNet().to(device)
    x = torch.rand(images, 3, 32, 32)
    y = torch.randint(0, 10, (images,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)
    compiled = hetcomp.compile(model, "pcm+digital", (x[:2].to(device),), strategy="first-last-digital")
    compiled.evaluate((x[:8], y[:8]), repeats=1)  # lower and warm up before measuring
    with PeakMemory(device) as peak:
        result = compiled.evaluate(loader, repeats=2, **EVALUATION_MODES[mode])
    return result.seconds, peak.bytes or 0, x.numel() * 4 + y.numel() * 8


def evaluation(images: int, device: torch.device) -> None:
    """Each mode in a fresh process: on CPU the peak is the resident-set high-water mark, which memory freed
    by an earlier mode and reused would hide."""
    print(f"\nEvaluation: {images} images, conv1 digital (cached prefix), conv2 on PCM, 2 repeats, loader batches "
          "of 500; each mode in a fresh process")
    print(f"{'mode':34s} {'seconds':>8s} {'peak':>10s} {'x data':>7s}")
    for mode in EVALUATION_MODES:
        result = subprocess.run([sys.executable, __file__, "--evaluation-mode", mode, "--images", str(images),
                                 "--device", str(device)], capture_output=True, text=True, check=True)
        seconds, peak, data_bytes = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{mode:34s} {seconds:8.2f} {peak / 2**20:8.0f} MiB {peak / data_bytes:7.2f}   "
              f"(test set {data_bytes / 2**20:.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluation-mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_quiet(True)
    device = torch.device(args.device)
    if args.evaluation_mode:
        print(json.dumps(evaluation_peak(args.images, device, args.evaluation_mode)))
        return
    hessian(args.params, device)
    evaluation(args.images, device)


if __name__ == "__main__":
    main()
