"""Hessian statistics: hetcomp's shared-graph batched estimator vs a HILAL-style per-layer loop.

Both compute, for every weight layer, Tr(H_l) by Hutchinson (m Rademacher probes) and lambda_max
(up to K iterations), on the same calibration batches and trained weights.

- reference: what HILAL's code does -- for each layer and batch, a new forward/backward graph with
  create_graph=True, m sequential HVPs w.r.t. that layer, then K fixed power-iteration HVPs.
- hetcomp "full": one gradient graph per batch for all layers, reused by every HVP; m full-model
  HVPs (one per probe); lambda_max by Lanczos (``--eigen``, default) or power iteration, all layers
  in lockstep, stopped per layer at tolerance 1e-3.
- hetcomp "full m=...": the full estimator with the probes needed to match the reference's
  standard error (equal accuracy).
- hetcomp "block": per-layer probes (the reference's estimator and variance), same graph reuse.
- hetcomp "block+deflate": the block estimator deflated by the Lanczos Krylov bases (Lanczos runs first,
  keeps its bases; no extra HVP); then with the probes needed to match the reference's standard error.
- "reference + efficient double backward": the reference loop with only hetcomp's convolution/BatchNorm
  double backward switched on -- how much of the ratio that change alone gives.

All hetcomp rows include building the operator (gradient graphs) and, on CUDA, capturing the CUDA graphs.
``--batched yes`` vmaps each layer's probes; ``--cuda-graphs no`` turns off the replayed HVPs (on by
default on CUDA).

Prints per-model wall times, the speed ratio, and the agreement of the estimates (relative
difference of traces and lambda_max vs the reference, with the estimators' standard errors).

    python bench/hessian.py [--device cuda] [--batch 128] [--probes 10] [--iters 20] [--eigen power]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from hetcomp.analysis.double_backward import efficient_double_backward  # noqa: E402
from hetcomp.analysis.hessian import HessianOperator  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402
from hetcomp.training import trained  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference(model, names, batches, probes, iters, seed, fast_double_backward=False):
    """HILAL-style loop: new graph per layer and batch; fixed power iterations; per-layer probes."""
    generator = torch.Generator().manual_seed(seed)
    mode = efficient_double_backward if fast_double_backward else contextlib.nullcontext
    traces, eigens = [], []
    for name in names:
        weight = model.get_parameter(name)
        layer_traces, layer_eigens = [], []
        for inputs, labels in batches:
            with mode():
                loss = F.cross_entropy(model(inputs), labels)
            (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
            samples = []
            for _ in range(probes):
                v = (torch.randint(0, 2, weight.shape, generator=generator) * 2 - 1).to(weight)
                (hv,) = torch.autograd.grad(grad, weight, v, retain_graph=True)
                samples.append(float((v * hv).sum()))
            layer_traces.append(samples)
            v = torch.randn(weight.shape, generator=generator).to(weight)
            v = v / v.norm()
            eigen = 0.0
            for _ in range(iters):
                (hv,) = torch.autograd.grad(grad, weight, v, retain_graph=True)
                eigen = float((v * hv).sum())
                v = hv / hv.norm()
            layer_eigens.append(eigen)
        per_probe = torch.tensor(layer_traces).mean(0)  # average over batches, per probe
        traces.append((float(per_probe.mean()), float(per_probe.std() / probes**0.5)))
        eigens.append(statistics.mean(layer_eigens))
    return traces, eigens


BATCHED = False  # hetcomp's default: one probe per HVP
CUDA_GRAPHS = None  # hetcomp's default: replayed HVPs on CUDA
EIGEN = "lanczos"  # lambda_max method (hetcomp's default); "power" for tolerance-stopped power iteration


def ours(model, names, batches, probes, iters, seed, estimator):
    params = [model.get_parameter(n) for n in names]
    clock = Phases(params[0].device)
    op = HessianOperator(model, params, batches, F.cross_entropy, batched=BATCHED, cuda_graphs=CUDA_GRAPHS)
    clock("operator")
    kind, _, deflate = estimator.partition("+")
    if deflate:  # Lanczos first; its Krylov bases deflate the probes
        eigen, used = op.lanczos(iters, 1e-3, torch.Generator().manual_seed(seed + 1), keep_vectors=True)
        clock("lanczos")
        result = op.hutchinson(probes, torch.Generator().manual_seed(seed), kind, deflate=op.deflations)
        clock("hutchinson")
        clock.report(f"{estimator} m={probes}: {op.hvp_calls} block HVPs")
        return list(zip(result.trace, result.trace_stderr)), eigen, used
    result = op.hutchinson(probes, torch.Generator().manual_seed(seed), kind)
    eigen_method = op.lanczos if EIGEN == "lanczos" else op.power_iteration
    eigen, used = eigen_method(iters, 1e-3, torch.Generator().manual_seed(seed + 1))
    return list(zip(result.trace, result.trace_stderr)), eigen, used


class Phases:
    """Wall time of each phase of one hetcomp run (printed with --phases)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []
        sync(device)
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times.append((name, now - self.last))
        self.last = now

    def report(self, label: str) -> None:
        if PHASES:
            print(f"    phases ({label}): " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in self.times))


def timed(fn, device, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


ALL_ESTIMATORS = ("full", "full-matched", "block", "block+deflate", "block+deflate-matched")
REFERENCE_FAST = False
PHASES = False
ESTIMATORS = ALL_ESTIMATORS


def compare(label, model, batches, device, probes, iters):
    model = model.to(device).eval()
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    ours(model, names, batches[:1], 2, 2, 0, "full")  # warm-up (allocator, kernels)
    t_ref, (ref_traces, ref_eigens) = timed(lambda: reference(model, names, batches, probes, iters, 0), device)
    print(f"\n== {label}: {len(names)} weight layers, {len(batches)} batch(es) of {batches[0][0].shape[0]}, "
          f"m={probes}, K={iters}, device={device}")
    print(f"reference (HILAL-style loop): {t_ref:8.2f} s")
    if REFERENCE_FAST:
        t_fast, _ = timed(lambda: reference(model, names, batches, probes, iters, 0, True), device)
        print(f"reference + efficient double backward: {t_fast:8.2f} s   speed ratio {t_ref / t_fast:6.2f}x")
    matched = {}
    for estimator in ESTIMATORS:
        kind = estimator.split("-")[0]
        if estimator.endswith("-matched"):
            if kind not in matched:
                continue
            # Equal estimate accuracy: variance scales as 1/m, so scale the probes by the measured s.e. ratio^2.
            count = max(2, round(probes * matched[kind] ** 2))  # 2: the fewest that give an s.e.
            label_est = f"{kind} m={count}"
        else:
            count, label_est = probes, f"{estimator} m={probes}"
        t_ours, (traces, eigens, used) = timed(
            lambda est=kind, c=count: ours(model, names, batches, c, iters, 0, est), device)
        trace_diff = [abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(traces, ref_traces)]
        # agreement within the two estimators' combined standard error (2 sigma)
        within = sum(abs(a[0] - b[0]) <= 2 * (a[1] ** 2 + b[1] ** 2) ** 0.5 for a, b in zip(traces, ref_traces))
        eig_diff = [abs(a - b) / abs(b) for a, b in zip(eigens, ref_eigens)]
        stderr_ratio = statistics.median(a[1] / b[1] for a, b in zip(traces, ref_traces) if b[1] > 0)
        if not estimator.endswith("-matched"):
            matched[kind] = stderr_ratio
        print(f"hetcomp {label_est:19s}: {t_ours:8.2f} s   speed ratio {t_ref / t_ours:6.2f}x   "
              f"trace rel.diff median {statistics.median(trace_diff):.3f} "
              f"(within 2 s.e.: {within}/{len(names)}; s.e. ratio vs ref {stderr_ratio:.2f})   "
              f"lambda_max rel.diff median {statistics.median(eig_diff):.4f} max {max(eig_diff):.4f}   "
              f"{EIGEN} iters mean {statistics.mean(used):.1f}")
    return t_ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="calibration batch size (default: 128 GPU, 32 CPU)")
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--models", default="digits,resnet20")
    parser.add_argument("--batched", choices=["yes", "no"], default="no",
                        help="vmap each layer's probes (hetcomp default: no)")
    parser.add_argument("--cuda-graphs", choices=["auto", "yes", "no"], default="auto",
                        help="replay captured HVPs (hetcomp default auto: on CUDA)")
    parser.add_argument("--phases", action="store_true", help="print each hetcomp run's phase times")
    parser.add_argument("--reference-fast", action="store_true",
                        help="also time the reference loop with hetcomp's efficient double backward")
    parser.add_argument("--eigen", choices=["power", "lanczos"], default="lanczos", help="lambda_max method")
    parser.add_argument("--estimators", default=",".join(ALL_ESTIMATORS),
                        help=f"comma-separated subset of {', '.join(ALL_ESTIMATORS)}")
    args = parser.parse_args()
    global BATCHED, CUDA_GRAPHS, EIGEN, ESTIMATORS, REFERENCE_FAST, PHASES
    REFERENCE_FAST, PHASES = args.reference_fast, args.phases
    ESTIMATORS = tuple(e for e in args.estimators.split(",") if e)
    EIGEN = args.eigen
    BATCHED = args.batched == "yes"
    CUDA_GRAPHS = {"auto": None, "yes": True, "no": False}[args.cuda_graphs]
    set_quiet(True)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device} ({name}), "
          f"batched HVPs: {args.batched}, CUDA graphs: {args.cuda_graphs}, lambda_max: {args.eigen}")

    from digits_cnn import build
    from resnet20 import ResNet20, digits_as_cifar

    if "digits" in args.models:
        model, data = build()
        loader = torch.utils.data.DataLoader(data["train"].dataset, batch_size=batch, shuffle=False)
        batches = [b for _, b in zip(range(args.batches), loader)]
        compare("digits CNN (trained)", model, batches, device, args.probes, args.iters)
    if "resnet20" in args.models:
        splits = digits_as_cifar()
        torch.manual_seed(0)
        model = trained(ResNet20(), splits.loader("train", batch_size=64), epochs=3, lr=3e-3)
        loader = torch.utils.data.DataLoader(splits.train, batch_size=batch, shuffle=False)
        batches = [b for _, b in zip(range(args.batches), loader)]
        compare("ResNet-20 (trained 3 epochs on digits at 32x32)", model, batches, device, args.probes, args.iters)


if __name__ == "__main__":
    main()
