"""HILAL Proposition 1 against Monte Carlo, per layer and per gamma, on the trained digits CNN.

Proposition 1: under Gaussian weight noise N(0, sigma^2), sigma = gamma * max|W_l|, on layer l alone, the
expected loss increase is sigma^2 / 2 * Tr(H_l) (= d_l * HNI_l) up to second order. This bench measures the
ratio measured / predicted for every weight layer at gamma = 0.005 ... 0.16 (hetcomp's default is 0.08, PCM's):

- predicted: sigma^2 / 2 * Tr(H_l), Tr(H_l) by Hutchinson (per-layer probes, deflated by a 20-step Lanczos
  basis) on the same batch, with its standard error;
- measured: mean over antithetic draws (+eps and -eps, which cancels the gradient term exactly) of the loss
  increase with noise on that layer only, with its standard error.

The model is examples/digits_cnn.py's (trained here, cached under build/weights), in float64 so that the
small-gamma increases are not rounding; the batch is the first 256 images of the training split. A ratio of 1 is
the second-order model holding; the summary lists the gammas where the ratio is consistent with 1.

    python bench/prop1_gamma.py [--draws 80] [--probes 60] [--batches 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from hetcomp.analysis.hessian import HessianOperator  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402

GAMMAS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
DEFAULT_GAMMA = 0.08
SMALL_GAMMA = 0.02
# the later layers are cheap to re-run (only the steps from the noisy layer on): more draws, tighter ratios
DRAW_FACTOR = {"conv4.weight": 2, "fc1.weight": 4, "fc2.weight": 16}


def stages(model) -> list[tuple[str, object]]:
    """DigitsCNN's forward as (weight name, step) pairs, so that noise on one layer re-runs only the steps from
    that layer on (the input to the layer is computed once)."""
    relu, pool = torch.relu, model.pool
    return [
        ("conv1.weight", lambda h: relu(model.conv1(h))),
        ("conv2.weight", lambda h: pool(relu(model.conv2(h)))),
        ("conv3.weight", lambda h: relu(model.conv3(h))),
        ("conv4.weight", lambda h: pool(relu(model.conv4(h)))),
        ("fc1.weight", lambda h: relu(model.fc1(h.flatten(1)))),
        ("fc2.weight", lambda h: model.fc2(h)),
    ]


def loss_increases(steps, index, x, y, weight, sigma, draws, generator):
    """Antithetic Monte-Carlo draws of the loss increase under N(0, sigma^2) noise on ``weight`` (the weight of
    ``steps[index]``) only."""
    with torch.no_grad():
        h = x
        for _, step in steps[:index]:
            h = step(h)

        def loss() -> float:
            out = h
            for _, step in steps[index:]:
                out = step(out)
            return float(F.cross_entropy(out, y))

        original = weight.detach().clone()
        out = torch.empty(draws, dtype=torch.float64)
        base = loss()
        for draw in range(draws):
            noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * sigma
            weight.copy_(original + noise)
            plus = loss()
            weight.copy_(original - noise)
            minus = loss()
            out[draw] = (plus + minus) / 2 - base
        weight.copy_(original)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=80, help="antithetic noise draws per gamma (x DRAW_FACTOR)")
    parser.add_argument("--probes", type=int, default=60, help="Hutchinson probes for Tr(H)")
    parser.add_argument("--batches", type=int, default=2, help="training batches of 128 images (Tr(H) and MC)")
    parser.add_argument("--out", default="bench/results", help="folder for prop1_gamma.txt and .png")
    args = parser.parse_args(argv)
    set_quiet(True)
    from digits_cnn import build

    start = time.perf_counter()
    model, loaders = build()
    model = model.double().eval()
    batches = list(loaders["train"])[: args.batches]
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    steps = stages(model)
    names = [name for name, _ in steps]
    with torch.no_grad():
        h = x
        for _, step in steps:
            h = step(h)
        assert torch.equal(h, model(x)), "stages() no longer matches DigitsCNN.forward"
    params = [model.get_parameter(name) for name in names]
    operator = HessianOperator(model, params, [(x, y)], F.cross_entropy)
    operator.lanczos(max_iter=20, tol=1e-10, generator=torch.Generator().manual_seed(0), keep_vectors=True)
    trace = operator.hutchinson(args.probes, torch.Generator().manual_seed(1), "block", deflate=operator.deflations)
    generator = torch.Generator().manual_seed(2)
    ratios: dict[str, list[tuple[float, float]]] = {}
    per_weight: dict[float, list[tuple[float, float]]] = {}  # gamma -> per layer (HNI, measured increase / d)
    lines = [f"HILAL Proposition 1 on the digits CNN (float64, {len(x)} training images): measured / predicted loss "
             "increase",
             f"under N(0, (gamma max|W|)^2) noise on one layer; Tr(H) from {args.probes} deflated Hutchinson probes; "
             "antithetic draws",
             "per cell as listed; +- is 2 standard errors.", ""]
    lines.append(f"{'layer':8s} {'weights':>7s} {'draws':>5s} {'Tr(H)':>14s} "
                 + " ".join(f"{'g=' + format(g, 'g'):>13s}" for g in GAMMAS))
    for index, (name, weight) in enumerate(zip(names, params)):
        tr, tr_se = float(trace.trace[index]), float(trace.trace_stderr[index])
        count = args.draws * DRAW_FACTOR.get(name, 1)
        row = []
        for gamma in GAMMAS:
            sigma = gamma * float(weight.detach().abs().max())
            predicted = sigma**2 / 2 * tr
            draws = loss_increases(steps, index, x, y, weight, sigma, count, generator)
            measured, measured_se = float(draws.mean()), float(draws.std() / math.sqrt(len(draws)))
            ratio = measured / predicted
            row.append((ratio, abs(ratio) * math.hypot(measured_se / measured, tr_se / tr)))
            per_weight.setdefault(gamma, []).append((predicted / weight.numel(), measured / weight.numel()))
        ratios[name] = row
        cells = " ".join(f"{r:6.2f}+-{2 * se:5.2f}" for r, se in row)
        lines.append(f"{name.removesuffix('.weight'):8s} {weight.numel():7d} {count:5d} {tr:8.3f}+-{2 * tr_se:5.3f} "
                     f"{cells}")
    lines.append("")
    lines.append("Where the second-order model holds: gammas at which the ratio is consistent with 1 (|ratio - 1| <= 2 "
                 "standard errors);")
    lines.append(f"small-gamma ratio = mean over gamma <= {SMALL_GAMMA:g}.")
    for name, row in ratios.items():
        consistent = [g for g, (r, se) in zip(GAMMAS, row) if abs(r - 1) <= 2 * se]
        small = [r for g, (r, _) in zip(GAMMAS, row) if g <= SMALL_GAMMA]
        default = row[GAMMAS.index(DEFAULT_GAMMA)]
        lines.append(f"  {name.removesuffix('.weight'):8s} consistent with 1 at gamma "
                     f"{', '.join(format(g, 'g') for g in consistent) if consistent else 'none'}; small-gamma ratio "
                     f"{sum(small) / len(small):.2f}; at the default {DEFAULT_GAMMA:g}: {default[0]:.2f} +- "
                     f"{2 * default[1]:.2f}")
    lines.append("Does HNI still rank the layers like the measured increase per weight? Spearman rho over the "
                 f"{len(names)} layers:")
    lines.append("  " + ", ".join(f"gamma {g:g}: {spearmanr(*zip(*per_weight[g])).statistic:.2f}" for g in GAMMAS))
    lines.append(f"(wall time {time.perf_counter() - start:.0f} s)")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prop1_gamma.txt").write_text(text + "\n")
    plot(ratios, out / "prop1_gamma.png")
    return 0


def plot(ratios: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhspan(0.9, 1.1, color="0.9", label="within 10%")
    ax.axhline(1.0, color="0.4", lw=0.8)
    ax.axvline(DEFAULT_GAMMA, color="tab:red", lw=0.8, ls="--", label=f"default gamma {DEFAULT_GAMMA:g}")
    for name, row in ratios.items():
        ax.errorbar(GAMMAS, [r for r, _ in row], yerr=[2 * se for _, se in row], marker="o", ms=3, capsize=2,
                    label=name.removesuffix(".weight"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gamma (noise std / max|W|)")
    ax.set_ylabel("measured / predicted loss increase")
    ax.set_title("HILAL Prop. 1 on the digits CNN, one layer noisy at a time")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
