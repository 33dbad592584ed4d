"""Where an HVP's time goes on a GPU: times one sweep of block HVPs (H_ll v_l for every layer) and one
full-model HVP of ResNet-20 in several formulations, checks they agree, and profiles the kernels.

    python bench/hvp_variants.py [--batch 128] [--profile] [--only-new]   (--only-new: CUDA only)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, linearize, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from resnet20 import ResNet20  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps=5):
    fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class ChannelAffine(nn.Module):
    """Eval-mode BatchNorm as y = x * scale + shift (same function, cheap double backward)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1))
        self.register_buffer("shift", (bn.bias.detach() - bn.running_mean * scale).reshape(1, -1, 1, 1))

    def forward(self, x):
        return x * self.scale + self.shift


def fold_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, ChannelAffine(child))
        else:
            fold_bn(child)
    return module


def variants(model, x, y, label):
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    params = [model.get_parameter(n) for n in names]
    gen = torch.Generator(device=DEV).manual_seed(0)
    vecs = [torch.randn(p.shape, device=DEV, generator=gen) for p in params]
    out = {}

    # -- reverse-over-reverse, retained gradient graph (hetcomp's eager path)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def block_rr():
        return [torch.autograd.grad(g, p, v, retain_graph=True)[0] for g, p, v in zip(grads, params, vecs)]

    def full_rr():
        return torch.autograd.grad(grads, params, vecs, retain_graph=True)

    def gradient():
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    out["gradient (fwd+bwd)"] = median_ms(gradient)
    out["full HVP rev-over-rev (retained)"] = median_ms(full_rr)
    out["block sweep rev-over-rev (22 grads)"] = median_ms(block_rr)
    ref_block = block_rr()
    ref_full = full_rr()

    # -- forward-over-reverse through torch.func
    base = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    primals = tuple(p.detach() for p in params)

    def loss_of(weights):
        merged = dict(base)
        merged.update(zip(names, weights))
        return F.cross_entropy(functional_call(model, (merged, buffers), (x,)), y)

    grad_fn = grad(loss_of)

    def full_fr(tangents):
        return jvp(grad_fn, (primals,), (tangents,))[1]

    def rel(a, b):
        return max(float((u - v).norm() / v.norm()) for u, v in zip(a, b))

    out["full HVP fwd-over-rev (torch.func)"] = median_ms(lambda: full_fr(tuple(vecs)))
    out["  agreement full fwd-over-rev"] = rel(full_fr(tuple(vecs)), ref_full)

    count = len(params)
    onehot = tuple(torch.zeros((count, *p.shape), device=DEV) for p in params)
    for i, v in enumerate(vecs):
        onehot[i][i] = v

    def block_vmap():
        cols = vmap(full_fr)(onehot)
        return [cols[i][i] for i in range(count)]

    try:
        out["block sweep fwd-over-rev vmap(22)"] = median_ms(block_vmap, reps=3)
        out["  agreement block vmap"] = rel(block_vmap(), ref_block)
    except Exception as exc:  # noqa: BLE001
        out["block sweep fwd-over-rev vmap(22)"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"

    try:
        _, lin = linearize(grad_fn, primals)

        def block_lin():
            cols = vmap(lin)(onehot)
            return [cols[i][i] for i in range(count)]

        out["block sweep linearize+vmap(22)"] = median_ms(block_lin, reps=3)
        out["  agreement block linearize"] = rel(block_lin(), ref_block)
        out["full HVP linearize (1 tangent)"] = median_ms(lambda: lin(tuple(vecs)))
    except Exception as exc:  # noqa: BLE001
        out["block sweep linearize+vmap(22)"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"

    # per-layer forward-over-reverse, vmapped over 10 probes (Hutchinson for one layer)
    probes = 10

    def per_layer_probes():
        results = []
        for i in range(len(names)):
            def loss_one(w, i=i):
                merged = dict(base)
                merged[names[i]] = w
                return F.cross_entropy(functional_call(model, (merged, buffers), (x,)), y)
            g1 = grad(loss_one)
            tangents = torch.randn((probes, *primals[i].shape), device=DEV)
            results.append(vmap(lambda t, g1=g1, i=i: jvp(g1, (primals[i],), (t,))[1])(tangents))
        return results

    try:
        out[f"per-layer fwd-over-rev vmap({probes} probes) x22"] = median_ms(per_layer_probes, reps=3)
    except Exception as exc:  # noqa: BLE001
        out[f"per-layer fwd-over-rev vmap({probes} probes) x22"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"

    # rev-over-rev, is_grads_batched over 10 probes (full HVP)
    batched = [torch.randn((probes, *p.shape), device=DEV) for p in params]
    try:
        out[f"full HVP rev-over-rev is_grads_batched({probes})"] = median_ms(
            lambda: torch.autograd.grad(grads, params, batched, retain_graph=True, is_grads_batched=True), reps=3)
    except Exception as exc:  # noqa: BLE001
        out[f"full HVP rev-over-rev is_grads_batched({probes})"] = f"failed: {str(exc)[:200]}"
    try:
        out[f"full HVP fwd-over-rev vmap({probes})"] = median_ms(lambda: vmap(full_fr)(tuple(batched)), reps=3)
    except Exception as exc:  # noqa: BLE001
        out[f"full HVP fwd-over-rev vmap({probes})"] = f"failed: {str(exc)[:200]}"

    print(f"\n== {label}")
    for key, value in out.items():
        print(f"{key:50s} {value:10.3f}" if isinstance(value, float) else f"{key:50s} {value}")
    return block_rr


def rev_over_rev(model, x, y, label, fast=True, channels_last=False):
    """Reverse-over-reverse on a retained graph, with hetcomp's efficient double backward; eager and
    replayed from per-layer CUDA graphs."""
    from hetcomp.analysis.double_backward import efficient_double_backward
    model = copy.deepcopy(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    params = [model.get_parameter(n) for n in names]
    gen = torch.Generator(device=DEV).manual_seed(0)
    vecs = [torch.randn(p.shape, device=DEV, generator=gen) for p in params]
    out = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        start = time.perf_counter()
        if fast:
            with efficient_double_backward():
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.cuda.synchronize()
        out["gradient graph build"] = (time.perf_counter() - start) * 1e3

        def block():
            return [torch.autograd.grad(g, p, v, retain_graph=True)[0] for g, p, v in zip(grads, params, vecs)]

        def full():
            return torch.autograd.grad(grads, params, vecs, retain_graph=True)

        out["full HVP eager"] = median_ms(full)
        out["block sweep eager"] = median_ms(block)
        ref_block, ref_full = block(), full()
        try:
            start = time.perf_counter()
            static = [v.clone() for v in vecs]
            pool = torch.cuda.graph_pool_handle()
            graphs, outs = [], []
            for g, p, t in zip(grads, params, static):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    outs.append(torch.autograd.grad(g, p, t, retain_graph=True)[0])
                graphs.append(graph)
            full_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(full_graph, pool=pool, stream=side):
                full_out = torch.autograd.grad(grads, params, static, retain_graph=True)
            torch.cuda.synchronize()
            out["capture 23 graphs"] = (time.perf_counter() - start) * 1e3

            def replay_block():
                for graph in graphs:
                    graph.replay()
                return outs

            def replay_full():
                full_graph.replay()
                return full_out

            out["block sweep replayed (22 graphs)"] = median_ms(replay_block)
            out["full HVP replayed"] = median_ms(replay_full)
            rb, rf = [o.clone() for o in replay_block()], [o.clone() for o in replay_full()]
            out["  agreement replay vs eager"] = max(
                max(float((u - v).norm() / v.norm()) for u, v in zip(rb, ref_block)),
                max(float((u - v).norm() / v.norm()) for u, v in zip(rf, ref_full)))
        except Exception as exc:  # noqa: BLE001
            out["capture"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    torch.cuda.current_stream().wait_stream(side)
    print(f"\n== {label}")
    for key, value in out.items():
        print(f"{key:50s} {value:10.3f}" if isinstance(value, float) else f"{key:50s} {value}")
    return ref_block, ref_full


def linearize_setup(model, x, y):
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    base = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    primals = tuple(base[n] for n in names)

    def loss_of(weights):
        merged = dict(base)
        merged.update(zip(names, weights))
        return F.cross_entropy(functional_call(model, (merged, buffers), (x,)), y)

    sync()
    start = time.perf_counter()
    _, lin = linearize(grad(loss_of), primals)
    sync()
    setup = (time.perf_counter() - start) * 1e3
    count = len(names)
    for size in (22, 44, 88):
        tangents = tuple(torch.randn((size, *p.shape), device=DEV) for p in primals)
        print(f"linearize+vmap({size}) {median_ms(lambda t=tangents: vmap(lin)(t), reps=3):10.3f} ms")
    print(f"linearize setup {setup:10.1f} ms ({count} layers)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only-new", action="store_true", help="only the rev-over-rev/efficient variants")
    args = parser.parse_args()
    if args.only_new and DEV != "cuda":
        parser.error("--only-new times CUDA-graph replays: it needs a CUDA device")
    torch.manual_seed(0)
    print(torch.__version__, DEV, "cudnn.allow_tf32", torch.backends.cudnn.allow_tf32)
    model = ResNet20().to(DEV).eval()
    # a few train-mode forwards give BN non-trivial running statistics
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(256, 3, 32, 32, device=DEV))
        model.eval()
    x = torch.randn(args.batch, 3, 32, 32, device=DEV)
    y = torch.randint(0, 10, (args.batch,), device=DEV)
    if args.only_new:
        slow_block, slow_full = rev_over_rev(model, x, y, "rev-over-rev, PyTorch's double backward", fast=False)
        fast_block, fast_full = rev_over_rev(model, x, y, "rev-over-rev, efficient_double_backward")
        pairs = zip(fast_block + list(fast_full), slow_block + list(slow_full))
        print("agreement fast vs PyTorch:", max(float((u - v).norm() / v.norm()) for u, v in pairs))
        rev_over_rev(model, x, y, "rev-over-rev, efficient_double_backward, channels_last", channels_last=True)
        torch.backends.cudnn.benchmark = True
        rev_over_rev(model, x, y, "rev-over-rev, efficient_double_backward, cudnn.benchmark")
        torch.backends.cudnn.benchmark = False
        linearize_setup(model, x, y)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            from hetcomp.analysis.double_backward import efficient_double_backward
            names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
            params = [model.get_parameter(n) for n in names]
            with efficient_double_backward():
                loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            vecs = [torch.randn_like(p) for p in params]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                [torch.autograd.grad(g, p, v, retain_graph=True) for g, p, v in zip(grads, params, vecs)]
                sync()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        return
    sweep = variants(model, x, y, "ResNet-20, BN eval, cudnn.benchmark off")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sweep()
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    torch.backends.cudnn.benchmark = True
    variants(model, x, y, "ResNet-20, BN eval, cudnn.benchmark on")
    folded = fold_bn(copy.deepcopy(model)).eval()
    variants(folded, x, y, "ResNet-20, BN as channel affine, cudnn.benchmark on")
    torch.backends.cudnn.benchmark = False
    variants(folded, x, y, "ResNet-20, BN as channel affine, cudnn.benchmark off")


if __name__ == "__main__":
    main()
