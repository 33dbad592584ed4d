"""Multi-tier mapping (H3PIMAP) of a digits transformer on sram+reram+photonic: a Table-V-style comparison.

Strategies: every layer on one tier (dynamic products go to photonic, the only tier of the three that runs
them), an equal row split, the NSGA-II knee point (stage 1, ``pareto-po``) and NSGA-II + accuracy-driven
row remap (``pareto``). Latency and energy are for 1000 images; accuracy is top-1 on the test split over
noisy repeats; LEP is H3PIMAP's score (min-max normalized latency, energy and error, averaged).
Writes the Pareto front, the remap trajectory and the per-layer tier split as PNGs under build/demo/multitier.

At the paper's 6-bit photonic operands this model loses little on photonic, so row remap has little to do.
A second run maps to a user-registered 4-bit photonic tier (Table I's low end, ``photonic_target(4)``),
where photonic costs about 3 points and row remap has to buy them back.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from digits_transformer import build  # noqa: E402

import hetcomp  # noqa: E402
from hetcomp import plots, targets  # noqa: E402
from hetcomp.datasets import accuracy  # noqa: E402
from hetcomp.partition.mapping_cost import lep_scores  # noqa: E402
from hetcomp.targets.photonic import photonic_target  # noqa: E402

TIERS = "sram+reram+photonic"
IMAGES = 1000.0


def mapping_cost(manifest: hetcomp.Manifest) -> tuple[float, float]:
    """(latency s, energy J) for IMAGES images: the manifest's per-sample estimate scaled (both are linear)."""
    cost = manifest.summary["cost"]
    return cost["latency_s"] * IMAGES, cost["energy_j"] * IMAGES


OUT = Path("build/demo/multitier")


def main(repeats: int = 10) -> list[dict]:
    start = time.perf_counter()
    model, data = build()
    print(f"\ndigits transformer: test accuracy {accuracy(model, data['test']):.4f} (FP32, digital); "
          f"mapping to {TIERS}")
    search = dict(population=64, generations=100, samples=IMAGES)
    strategies = {
        "100% SRAM": "all-sram", "100% ReRAM": "all-reram", "100% photonic": "all-photonic",
        "equal split": "equal-split",
        "pareto PO (knee)": hetcomp.strategies.pareto(**search, remap=False),
        "pareto PO + RR": hetcomp.strategies.pareto(**search, tolerance=0.005, step=0.05, max_steps=10,
                                                    val_data=data["val"]),
    }
    example = (next(iter(data["train"]))[0],)
    rows, compiled_by_label = [], {}
    for label, strategy in strategies.items():
        t0 = time.perf_counter()
        needs_data = not isinstance(strategy, str)  # the search's row sensitivity and remap need data
        compiled = hetcomp.compile(model, TIERS, example_inputs=example, data=data["train"] if needs_data else None,
                                   strategy=strategy, seed=0)
        result = compiled.evaluate(data["test"], repeats=repeats)
        latency, energy = mapping_cost(compiled.manifest)
        rows.append({"label": label, "latency_s": latency, "energy_j": energy, "accuracy": result.mean,
                     "std": result.std, "seconds": time.perf_counter() - t0})
        compiled_by_label[label] = compiled
    scores = lep_scores([r["latency_s"] for r in rows], [r["energy_j"] for r in rows],
                        [1 - r["accuracy"] for r in rows])
    print(f"\n{'strategy':18s} {'latency µs':>11s} {'energy µJ':>10s} {'accuracy':>16s} {'LEP':>6s}")
    for row, score in zip(rows, scores):
        row["lep"] = float(score)
        print(f"{row['label']:18s} {row['latency_s'] * 1e6:11.2f} {row['energy_j'] * 1e6:10.2f} "
              f"{row['accuracy']:8.4f} ± {row['std']:.4f} {score:6.3f}")
    print(f"(latency and energy for {IMAGES:g} images; accuracy over {repeats} noisy repeats on the test split)")

    final = compiled_by_label["pareto PO + RR"].manifest
    _print_remap("6-bit photonic", final.extra["row_remap"])
    baselines = {r["label"]: (r["latency_s"], r["energy_j"]) for r in rows[:4]}
    written = [
        plots.pareto_front(final, OUT / "pareto_front.png", baselines,
                           final=(rows[-1]["latency_s"], rows[-1]["energy_j"])),
        plots.assignment_bar(final, OUT / "tier_split.png"),
    ]

    # Row remap with work to do: photonic at 4-bit operands (a user-registered target).
    targets.register(photonic_target(4, name="photonic4"), overwrite=True)
    low = hetcomp.compile(model, "sram+reram+photonic4", data=data["train"], seed=0, strategy=hetcomp.strategies.pareto(
        **search, tolerance=0.005, step=0.05, max_steps=20, val_data=data["val"]))
    result = low.evaluate(data["test"], repeats=repeats)
    latency, energy = mapping_cost(low.manifest)
    _print_remap("4-bit photonic", low.manifest.extra["row_remap"])
    print(f"  after remap: test accuracy {result.mean:.4f} ± {result.std:.4f}, latency {latency * 1e6:.2f} µs, "
          f"energy {energy * 1e6:.2f} µJ")
    written += [plots.row_remap_trajectory(low.manifest, OUT / "row_remap_4bit.png"),
                plots.assignment_bar(low.manifest, OUT / "tier_split_4bit.png")]
    print("plots: " + ", ".join(str(p) for p in written))
    print(f"multi-tier done in {time.perf_counter() - start:.1f} s")
    return rows


def _print_remap(label: str, remap: dict) -> None:
    first, last = remap["trajectory"][0], remap["trajectory"][-1]
    print(f"row remap ({label}): validation accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f} (digital "
          f"{remap['baseline_accuracy']:.4f}, tolerance {remap['tolerance']}) in {len(remap['trajectory']) - 1} "
          f"steps of {remap['step_rows']} rows; latency {first['latency_s'] * 1e6:.2f} -> "
          f"{last['latency_s'] * 1e6:.2f} µs; stopped: {remap['stopped']}")
    if remap.get("tier_quality"):
        measured = ", ".join(f"{name} {remap['tier_quality'][name]:.4f}" for name in remap["tier_order"])
        print(f"  tiers alone on validation: {measured} -> order {' > '.join(remap['tier_order'])} "
              f"(accuracy_rank: {' > '.join(remap['accuracy_rank_order'])})")


if __name__ == "__main__":
    main()
