"""HILAL Fig. 3: does HNI predict the damage of putting one layer on analog PCM?

For every weight layer l: only l is lowered to PCM (aihwkit, hetcomp's HILAL configuration), all others stay
digital, no fine-tuning; its 1-day test accuracy drop (digital accuracy - accuracy over ``--repeats``
programmed-and-drifted repeats) is set against the layer's HNI (HILAL Def. 1, from the same compile's Hessian
passes). Reported: Spearman rho between HNI and the drop, and between d_l x HNI_l = sigma^2/2 Tr(H_l) (Proposition
1's predicted loss increase of the whole layer) and the drop, each with a 95% interval over the measurement (the
drops' bootstrap over repeats and test images, paired over images, the HNI values held fixed), and the
permutation p-value of scipy. The paper's Fig. 3b goal: high-HNI layers lose most (rho >= 0.5). The paper's
per-layer accuracies are after fine-tuning that layer; here none (the raw damage HNI is meant to predict).

Workloads (bench/workloads.py): ``digits`` (the digits CNN), ``resnet20`` (digits-as-CIFAR 3x32x32, for a GPU),
``resnet20-8x8`` (ResNet-20 with one input channel on the native 8x8 digits: reduced, runs on a small CPU).

    python bench/fig3.py --model digits [--repeats 40] [--device cpu] [--out bench/results]
    python bench/fig3.py --model resnet20 --device cuda --epochs 30 --repeats 100
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import LABELS, MODELS, fixed_split  # noqa: E402

import hetcomp  # noqa: E402
from hetcomp.lower import lower_graph  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402
from hetcomp.stats import bootstrap_accuracies, bootstrap_difference, correctness, spearman  # noqa: E402


def _rank_rho(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if np.std(ry) == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (ResNet-20 workloads)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--probes", type=int, default=10, help="Hutchinson probes per layer (Tr(H), HNI)")
    parser.add_argument("--hessian-batches", type=int, default=1)
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    set_quiet(True)
    device = torch.device(args.device)
    start = time.perf_counter()
    model, data = fixed_split(args.model, args.epochs, device)
    x = next(iter(data["test"]))[0][:2].to(device)
    trained_s = time.perf_counter() - start
    compiled = hetcomp.compile(model, "pcm+digital", (x,), data=data["train"], strategy="all-analog", seed=0,
                               hessian={"probes": args.probes, "batches": args.hessian_batches})
    compile_s = time.perf_counter() - start - trained_s
    layers = [(a.layer.name, a) for _, a in hetcomp.mappable_nodes(compiled.graph)]
    digital_module, digital_report = lower_graph(compiled.graph, compiled.targets, layers=[])
    digital = correctness(digital_module, digital_report, data["test"], repeats=1)
    base = digital.double().mean().item()
    rows, matrices = [], []
    for name, annotation in layers:
        module, report = lower_graph(compiled.graph, compiled.targets, layers=[name])
        matrix = correctness(module, report, data["test"], repeats=args.repeats, seed=0)
        matrices.append(matrix)
        drop = bootstrap_difference(digital, matrix, draws=args.draws)
        hni = annotation.metrics.get("hni", math.nan)
        params = math.prod(annotation.layer.weight_shape)  # HNI's d_l: weight entries, bias excluded
        rows.append({"name": name, "hni": hni, "total": hni * params, "params": params, "macs": annotation.layer.macs,
                     "drop": drop, "accuracy": matrix.double().mean().item()})
        print(f"{name:28s} HNI {hni:10.3e}  drop {drop.format(100, 2)} points", flush=True)
    eval_s = time.perf_counter() - start - trained_s - compile_s
    hni = np.array([r["hni"] for r in rows])
    total = np.array([r["total"] for r in rows])
    drops = np.array([r["drop"].estimate for r in rows])
    ok = np.isfinite(hni)
    # rho's spread over the measurement: drops re-drawn (repeats and test images resampled; digital is exact)
    boot = base - bootstrap_accuracies(matrices, draws=args.draws)
    summary = {}
    for label, values in (("HNI", hni), ("d x HNI = sigma^2/2 Tr(H)", total)):
        rho, p = spearman(values[ok], drops[ok])
        draws = np.array([_rank_rho(values[ok], b[ok]) for b in boot])
        low, high = np.nanquantile(draws, [0.025, 0.975])
        summary[label] = (rho, p, low, high)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fig3_{args.model}{'_' + args.tag if args.tag else ''}"
    lines = [f"HILAL Fig. 3 on {LABELS[args.model]}: one layer at a time on PCM (hetcomp's HILAL configuration), "
             f"the rest digital, no fine-tuning",
             f"test images {digital.shape[1]}, {args.repeats} repeats at t = 1 day, device {device}; digital test "
             f"accuracy {base:.4f}; Hessian: {args.probes} probes x {args.hessian_batches} batch(es), gamma 0.08",
             f"times: train {trained_s:.0f} s, compile {compile_s:.0f} s, evaluation {eval_s:.0f} s", "",
             f"{'layer':28s} {'params':>8s} {'HNI':>10s} {'d x HNI':>10s} {'1-day acc':>9s}  drop, points [95%]"]
    for r in rows:
        lines.append(f"{r['name']:28s} {r['params']:8d} {r['hni']:10.3e} {r['total']:10.3e} {r['accuracy']:9.4f}  "
                     f"{r['drop'].format(100, 2)}")
    lines.append("")
    for label, (rho, p, low, high) in summary.items():
        lines.append(f"Spearman rho({label}, drop) = {rho:+.3f}  [95% over the measurement: {low:+.3f}, {high:+.3f}]"
                     f"  p = {p:.3g}  (n = {int(ok.sum())} layers; goal from the paper: rho >= 0.5)")
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.txt").write_text(text)
    print(text)
    _plot(rows, summary, base, LABELS[args.model], out / f"{stem}.png")


def _plot(rows: list[dict], summary: dict, base: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    hni = np.array([r["hni"] for r in rows])
    drop = np.array([r["drop"].estimate for r in rows]) * 100
    low = drop - np.array([r["drop"].low for r in rows]) * 100
    high = np.array([r["drop"].high for r in rows]) * 100 - drop
    fig, (left, right, third) = plt.subplots(1, 3, figsize=(18, 5))
    positions = np.arange(len(rows))
    left.bar(positions, hni, color="tab:blue", alpha=0.7, label="HNI")
    left.set_yscale("log")
    left.set_ylabel("HNI (log)", color="tab:blue")
    left.set_xticks(positions, names, rotation=70, fontsize=7)
    twin = left.twinx()
    twin.errorbar(positions, drop, yerr=[low, high], fmt="o", color="tab:red", capsize=2, label="drop")
    twin.axhline(0, color="grey", lw=0.5)
    twin.set_ylabel("1-day accuracy drop, points (95% CI)", color="tab:red")
    left.set_title(f"(a) per layer; digital accuracy {base * 100:.2f}%")
    total = np.array([r["total"] for r in rows])
    panels = ((right, hni, "tab:red", "HNI (log)", "(b) vs HNI", "HNI"),
              (third, total, "tab:purple", "d x HNI = sigma^2/2 Tr(H) (log)", "(c) vs d x HNI",
               "d x HNI = sigma^2/2 Tr(H)"))
    for axis, x, color, xlabel, label, key in panels:  # the drop against each sensitivity, with its Spearman rho
        axis.errorbar(x, drop, yerr=[low, high], fmt="o", color=color, capsize=2)
        for name, xv, yv in zip(names, x, drop):
            axis.annotate(name, (xv, yv), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.axhline(0, color="grey", lw=0.5)
        axis.set_xlabel(xlabel)
        rho, p, lo, hi = summary[key]
        axis.set_title(f"{label}: Spearman rho = {rho:+.2f} [{lo:+.2f}, {hi:+.2f}], p = {p:.2g}", fontsize=9)
    right.set_ylabel("accuracy drop, points")
    fig.suptitle(f"HNI vs one-layer-on-PCM damage: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
