"""Repeat evaluation: hetcomp's evaluator vs the plain loop (program, drift, iterate the DataLoader).

Both run the same number of independent repeats (re-program + drift to one day each) with the same
seeds on the same lowered model. Prints wall times (best of --trials), the speed ratio, and both mean accuracies (they
differ only by read-noise draws, since the evaluator batches differently).

    python bench/evaluate.py [--repeats 20] [--device cpu|cuda] [--strategies all-analog first-last-digital]
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
from hetcomp.evaluate import evaluate, plain_loop_accuracy  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=3, help="timings are the best of this many")
    parser.add_argument("--strategies", nargs="+", default=["all-analog", "first-last-digital", "hilal"])
    args = parser.parse_args()
    set_quiet(True)
    from digits_cnn import build

    model, data = build()
    model = model.to(args.device)
    x = next(iter(data["test"]))[0].to(args.device)
    print(f"digits CNN, {len(data['test'].dataset)} test images, {args.repeats} repeats, t = 1 day, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'strategy':20s} {'plain loop s':>12s} {'hetcomp s':>10s} {'ratio':>6s} {'plain acc':>10s} "
          f"{'hetcomp acc':>12s}")
    for strategy in args.strategies:
        compiled = hetcomp.compile(model, "pcm+digital", (x,), data=data["train"], strategy=strategy)
        module, report = compiled.module, compiled.lowering
        plain_s, fast_s = [], []
        for _ in range(args.trials):  # interleaved, best of: this machine's timings are noisy
            start = time.perf_counter()
            plain = plain_loop_accuracy(module, report, data["test"], args.repeats, 86400.0, seed=0)
            plain_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            fast = evaluate(module, report, data["test"], repeats=args.repeats, t_inference=86400.0, seed=0)
            fast_s.append(time.perf_counter() - start)
        plain_s, fast_s = min(plain_s), min(fast_s)
        print(f"{strategy:20s} {plain_s:12.2f} {fast_s:10.2f} {plain_s / fast_s:6.2f} "
              f"{statistics.fmean(plain):10.4f} {fast.mean:12.4f}")


if __name__ == "__main__":
    main()
