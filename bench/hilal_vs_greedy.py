"""Search-and-mapping time: HILAL (Hessian metrics + k-means + LAFT) vs LionHeart's mac-greedy search.

Both start from the same trained digits CNN on pcm+digital, use the same fine-tuning settings
(epochs, patience, learning rates, validation split) and are evaluated the same way on the held-out
test split (independent repeats, re-programmed and drifted to one day). No checkpoints are reused.
Prints both accuracies, MAC ratios and wall times, and the time ratio (the HILAL paper reports
about 3x on average across its models).

    python bench/hilal_vs_greedy.py [--epochs 10] [--repeats 20] [--threshold 0.02]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hetcomp  # noqa: E402
from hetcomp.finetune import LAFT  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.02, help="mac-greedy accuracy drop allowed")
    args = parser.parse_args()
    set_quiet(True)
    from digits_cnn import build

    model, data = build()
    x = next(iter(data["test"]))[0]
    finetune = LAFT(epochs=args.epochs, patience=args.patience, val_data=data["val"], checkpoint_dir=None)
    runs = {"hilal + LAFT": "hilal", "mac-greedy": hetcomp.strategies.mac_greedy(threshold=args.threshold)}
    results = {}
    for label, strategy in runs.items():
        start = time.perf_counter()
        compiled = hetcomp.compile(model, "pcm+digital", (x,), data=data["train"], strategy=strategy,
                                   finetune=finetune, seed=0)
        seconds = time.perf_counter() - start
        evaluation = compiled.evaluate(data["test"], repeats=args.repeats)
        on_pcm = [layer["name"] for layer in compiled.manifest.layers if layer["assignment"] == "pcm"]
        results[label] = seconds
        print(f"{label:14s} search+mapping {seconds:6.1f} s  {evaluation}  on pcm: {', '.join(on_pcm)}", flush=True)
    ratio = results["mac-greedy"] / results["hilal + LAFT"]
    print(f"time ratio mac-greedy / hilal+LAFT: {ratio:.2f}x (epochs {args.epochs}, patience {args.patience}, "
          f"threshold {args.threshold})")


if __name__ == "__main__":
    main()
