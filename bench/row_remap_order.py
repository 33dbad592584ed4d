"""Row remap with the tiers ordered by measured single-tier quality vs by the targets' fixed accuracy_rank.

The digits transformer (examples/digits_transformer.py) on sram+reram+photonic4 (4-bit photonic operands, where row
remap has work to do; examples/multitier.py's second run), NSGA-II then row remap on the validation split, once with
``tier_order="rank"`` (the former behaviour) and once with ``tier_order="measured"`` (each tier alone measured on
the validation data, ``repeats`` repeats; the default). Prints each tier's measured validation accuracy, both
orders, the remap trajectory's end, the moves' destinations, latency/energy (1000 images) and the test accuracy
with a 95% bootstrap interval over repeats and test images (hetcomp.stats).

    python bench/row_remap_order.py [--repeats 10] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import write_results  # noqa: E402

import hetcomp  # noqa: E402
from hetcomp import targets  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402
from hetcomp.stats import bootstrap_accuracy, correctness  # noqa: E402
from hetcomp.targets.photonic import photonic_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    set_quiet(True)
    from digits_transformer import build

    model, data = build()
    targets.register(photonic_target(4, name="photonic4"), overwrite=True)
    tiers = "sram+reram+photonic4"
    lines = [f"digits transformer on {tiers}; NSGA-II (population 64, {args.generations} generations), row remap "
             f"(tolerance 0.005, step 5%, up to 20 steps) on the validation split; test: {args.repeats} repeats", ""]
    for order in ("rank", "measured"):
        start = time.perf_counter()
        strategy = hetcomp.strategies.pareto(population=64, generations=args.generations, samples=1000.0,
                                             tolerance=0.005, step=0.05, max_steps=20, val_data=data["val"],
                                             tier_order=order)
        compiled = hetcomp.compile(model, tiers, data=data["train"], seed=0, strategy=strategy)
        remap = compiled.manifest.extra["row_remap"]
        matrix = correctness(compiled.module, compiled.lowering, data["test"], repeats=args.repeats, seed=0)
        cost = compiled.manifest.summary["cost"]
        first, last = remap["trajectory"][0], remap["trajectory"][-1]
        moves = Counter()
        for step in remap["trajectory"][1:]:
            for key, rows in step["moved"].items():
                moves[key.split(": ")[1]] += rows
        lines.append(f"tier_order={order!r}: order {' > '.join(remap['tier_order'])}")
        if remap["tier_quality"]:
            lines.append("  each tier alone, validation accuracy: " + ", ".join(
                f"{name} {remap['tier_quality'][name]:.4f}" for name in remap["tier_order"]))
        lines.append(f"  validation accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f} (digital "
                     f"{remap['baseline_accuracy']:.4f}) in {len(remap['trajectory']) - 1} steps; stopped: "
                     f"{remap['stopped']}")
        lines.append(f"  rows moved: {dict(moves) or 'none'}")
        accuracy = bootstrap_accuracy(matrix).format(100, 2)
        lines.append(f"  latency {cost['latency_s'] * 1e9:.2f} µs, energy {cost['energy_j'] * 1e9:.2f} µJ "
                     f"(1000 images); test accuracy {accuracy} %  ({time.perf_counter() - start:.0f} s)")
        print("\n".join(lines[-5:]), flush=True)
    write_results(args.out, "row_remap_order.txt", lines)


if __name__ == "__main__":
    main()
