"""PIM crossbar simulator speed: the batched forward (every bit-plane, cell slice and crossbar chunk in one
batched matmul per block of samples) against the plain loop it replaced and the digital matmul it simulates.

The arithmetic floor of a bit-serial, bit-sliced forward is (input bit-planes x cell slices) x the digital MACs,
times 4 for the two signs of inputs and weights (sign-magnitude arrays): 7 x 7 x 4 = 196 for SRAM, 7 x 4 x 4 = 112
for ReRAM. Prints seconds and the ratios to the digital forward.

    python bench/tier_sim.py [--tokens 1024] [--shape 384x1536]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hetcomp import targets  # noqa: E402
from hetcomp.lower.tier_sim import PimCrossbarSimulator  # noqa: E402


def best(fn, trials: int = 3) -> float:
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--shape", default="384x1536")
    args = parser.parse_args()
    from test_multitier import _crossbar_reference

    inputs, outputs = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    linear = nn.Linear(inputs, outputs)
    x = torch.randn(args.tokens, inputs)
    print(f"Linear {inputs}->{outputs}, {args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'tier':6s} {'digital s':>10s} {'loop s':>9s} {'batched s':>10s} {'loop/digital':>13s} "
          f"{'batched/digital':>16s} {'speed-up':>9s}")
    with torch.no_grad():
        digital = best(lambda: linear(x), 5)
        for tier in ("sram", "reram"):
            core = PimCrossbarSimulator().lower(linear, targets.get(tier))
            loop = best(lambda core=core: _crossbar_reference(core, x), 1)
            batched = best(lambda core=core: core(x))
            print(f"{tier:6s} {digital:10.4f} {loop:9.3f} {batched:10.3f} {loop / digital:13.0f} "
                  f"{batched / digital:16.0f} {loop / batched:8.2f}x")


if __name__ == "__main__":
    main()
