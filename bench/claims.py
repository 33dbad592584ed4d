"""Strategy comparisons with resolution: 1-day accuracy per partition strategy, with 95% intervals over hardware
repeats AND test images, and a claim only where the sample-paired difference's interval excludes 0.

All 1,797 digits by K-fold cross-validation (seeded): for each fold a model is trained on the other folds (cached
under build/weights/), compiled once per strategy (pcm+digital; the Hessian annotations are computed once per fold
and shared by every strategy, so strategies differ only in their partition), optionally fine-tuned with LAFT, and
its per-image correctness over ``--repeats`` programmed-and-drifted repeats recorded on the held-out fold
(hetcomp.stats.correctness). The folds' matrices are joined along the images ([repeats, 1797]); intervals are the
two-way bootstrap of hetcomp.stats (repeats and images resampled), differences paired over images.

Workloads (bench/workloads.py): ``resnet20`` (digits-as-CIFAR 3x32x32, for a GPU), ``resnet20-8x8`` (ResNet-20
with one input channel on the native 8x8 digits: reduced, for a small CPU), ``digits`` (the digits CNN).

    python bench/claims.py --model resnet20 --device cuda --epochs 30 --repeats 50 [--laft-epochs 10]
    python bench/claims.py --model resnet20-8x8 --epochs 15 --repeats 20          # reduced, CPU
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import LABELS, MODELS, all_digits, images, loader, train_model  # noqa: E402

import hetcomp  # noqa: E402
from hetcomp.finetune import LAFT  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402
from hetcomp.stats import bootstrap_accuracy, bootstrap_difference, correctness  # noqa: E402

STRATEGIES = ("all-digital", "all-analog", "first-last-digital", "hilal", "hni-only", "scr-only")


class ReuseMetrics(hetcomp.Pass):
    """Writes the fold's Hessian metrics (computed once, by the reference compile) onto every layer, so all
    strategies partition the same numbers (the compile's own Hessian passes run with 1 probe and are overwritten)."""

    name = "reuse_hessian_metrics"
    requires = ("layers",)
    provides = ()

    def __init__(self, metrics: dict[str, dict]) -> None:
        self.metrics = metrics

    def run(self, gm, ctx):
        for _, annotation in hetcomp.mappable_nodes(gm):
            annotation.metrics.update(copy.deepcopy(self.metrics[annotation.layer.name]))
        return gm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="resnet20")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per fold")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--laft-epochs", type=int, default=0, help="LAFT after each partition (0: none)")
    parser.add_argument("--probes", type=int, default=10, help="Hutchinson probes (Tr(H), HNI)")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    set_quiet(True)
    device = torch.device(args.device)
    strategies = args.strategies.split(",")
    x_all, y_all = all_digits()
    x_all = images(args.model, x_all)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    folds = [torch.as_tensor(part) for part in np.array_split(order.numpy(), args.folds)]
    matrices: dict[str, list[torch.Tensor]] = {s: [] for s in strategies}
    mac_ratio: dict[str, list[float]] = {s: [] for s in strategies}
    on_pcm: dict[str, list[int]] = {s: [] for s in strategies}
    fold_lines = []
    start = time.perf_counter()
    for k, test in enumerate(folds):
        train = torch.cat([f for j, f in enumerate(folds) if j != k])
        t0 = time.perf_counter()
        model = train_model(args.model, x_all[train], y_all[train], args.epochs, device, tag=f"cv{k}of{args.folds}")
        train_loader = loader(x_all[train], y_all[train])
        test_loader = loader(x_all[test], y_all[test])
        example = x_all[test][:2].to(device)
        reference = hetcomp.compile(model, "pcm+digital", (example,), data=train_loader, strategy="all-analog",
                                    seed=0, hessian={"probes": args.probes})
        metrics = {a.layer.name: dict(a.metrics) for _, a in hetcomp.mappable_nodes(reference.graph)}
        cells = []
        for strategy in strategies:
            finetune = (LAFT(epochs=args.laft_epochs, patience=3, checkpoint_dir=None)
                        if args.laft_epochs and strategy != "all-digital" else None)
            compiled = hetcomp.compile(model, "pcm+digital", (example,), data=train_loader, strategy=strategy,
                                       seed=0, hessian={"probes": 1, "max_iter": 2}, passes=[ReuseMetrics(metrics)],
                                       finetune=finetune)
            matrix = correctness(compiled.module, compiled.lowering, test_loader, repeats=args.repeats, seed=k)
            matrices[strategy].append(matrix)
            mac_ratio[strategy].append(float(compiled.manifest.summary["mac_ratio"].get("pcm", 0.0)))
            on_pcm[strategy].append(sum(layer["assignment"] == "pcm" for layer in compiled.manifest.layers))
            cells.append(f"{strategy} {matrix.double().mean().item():.4f}")
        fold_lines.append(f"fold {k + 1}/{args.folds} ({len(test)} images, {time.perf_counter() - t0:.0f} s): "
                          + ", ".join(cells))
        print(fold_lines[-1], flush=True)
    joined = {s: torch.cat(matrices[s], dim=1) for s in strategies}
    intervals = {s: bootstrap_accuracy(joined[s], draws=args.draws) for s in strategies}
    layers = len(metrics)
    lines = [f"Strategy comparison on {LABELS[args.model]}, all {len(y_all)} digits by {args.folds}-fold "
             f"cross-validation (a model per fold, {args.epochs} epochs), pcm+digital (hetcomp's HILAL "
             f"configuration), {f'LAFT {args.laft_epochs} epochs' if args.laft_epochs else 'no fine-tuning'}, "
             f"{args.repeats} repeats at t = 1 day per fold; device {device}; {time.perf_counter() - start:.0f} s",
             "95% intervals: bootstrap over repeats and images (hetcomp.stats)", "",
             f"{'strategy':20s} {'PCM MAC ratio':>13s} {'layers on PCM':>14s} {'1-day accuracy % [95%]':>24s}"]
    for s in strategies:
        lines.append(f"{s:20s} {np.mean(mac_ratio[s]):13.3f} {np.mean(on_pcm[s]):8.1f} of {layers:<3d} "
                     f"{intervals[s].format(100, 2):>24s}")
    lines += ["", "pairwise: accuracy(A) - accuracy(B), points [95%, paired over images and repeats]; claim where the "
              "interval excludes 0"]
    claims, unresolved = [], []
    for a, b in itertools.combinations(strategies, 2):
        diff = bootstrap_difference(joined[a], joined[b], draws=args.draws)
        marginal = "disjoint" if intervals[a].disjoint(intervals[b]) else "overlapping"
        line = f"  {a:>18s} - {b:<18s} {diff.format(100, 2):>24s}  (marginal intervals {marginal})"
        lines.append(line)
        if diff.excludes_zero:
            better, worse = (a, b) if diff.estimate > 0 else (b, a)
            low, high = sorted((abs(diff.low) * 100, abs(diff.high) * 100))
            claims.append(f"  {better} > {worse} by {abs(diff.estimate) * 100:.2f} points [{low:.2f}, {high:.2f}] "
                          f"(PCM MAC ratio {np.mean(mac_ratio[better]):.3f} vs {np.mean(mac_ratio[worse]):.3f})")
        else:
            unresolved.append(f"{a} vs {b}")
    lines += ["", "claims (difference interval excludes 0):"] + (claims or ["  none"])
    lines += ["not resolved: " + ("; ".join(unresolved) if unresolved else "none"), ""] + fold_lines
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"claims_{args.model}{'_' + args.tag if args.tag else ''}"
    (out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
