"""GlobalBatchNorm on CUDA: the composite kernels the CPU uses against torch's CUDA kernels, and two ranks against one.

    python bench/check_batchnorm_kernels.py                              # kernels: composite vs torch, on one GPU
    torchrun --nproc-per-node 2 bench/check_batchnorm_kernels.py         # and GlobalBatchNorm over NCCL vs BatchNorm

``hetcomp.finetune.global_batchnorm`` runs torch's five CUDA-only BatchNorm statistics kernels on CUDA and composite
operations of the same signatures elsewhere; CI tests the composite path against one BatchNorm under gloo. This
checks the other half, which needs a GPU: each kernel's results (statistics, merged statistics over three ranks of
unequal counts, running statistics, the elementwise output, the backward's reductions and input gradient) agree
with the composite version on the same inputs, and under torchrun GlobalBatchNorm on uneven slices (NCCL) gives one
BatchNorm's output, gradients and running statistics on the whole batch. Prints the largest differences and exits
non-zero on a mismatch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from hetcomp.finetune.global_batchnorm import GlobalBatchNorm, _CompositeKernels


def close(name: str, got: torch.Tensor, expected: torch.Tensor, failures: list[str], tolerance: float = 1e-4) -> None:
    got, expected = got.detach(), expected.detach()
    difference = float((got.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max()) or 1.0
    ok = difference <= tolerance * scale
    print(f"  {name:<34} max |diff| {difference:.2e} (scale {scale:.2e}) {'ok' if ok else 'MISMATCH'}")
    if not ok:
        failures.append(name)


def kernels(device: torch.device, failures: list[str]) -> None:
    print("kernels: torch (CUDA) vs composite")
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(6, 5, 7, 7, generator=generator) * 3 + 1).to(device)
    dy = torch.randn(6, 5, 7, 7, generator=generator).to(device)
    weight = torch.rand(5, generator=generator).add(0.5).to(device)
    bias = torch.randn(5, generator=generator).to(device)
    eps, momentum = 1e-5, 0.3
    for name, a, b in zip(("stats mean", "stats invstd"), torch.batch_norm_stats(x, eps),
                          _CompositeKernels.batch_norm_stats(x, eps)):
        close(name, a, b, failures)
    mean_all = torch.randn(3, 5, generator=generator).to(device)
    invstd_all = torch.rand(3, 5, generator=generator).add(0.2).to(device)
    counts = torch.tensor([3.0, 98.0, 49.0], device=device)
    running = [(torch.zeros(5, device=device), torch.ones(5, device=device)) for _ in range(2)]
    merged = [impl.batch_norm_gather_stats_with_counts(x, mean_all, invstd_all, *stats, momentum, eps, counts)
              for impl, stats in zip((torch, _CompositeKernels), running)]
    for index, name in enumerate(("gathered mean", "gathered invstd")):
        close(name, merged[0][index], merged[1][index], failures)
    close("running mean", running[0][0], running[1][0], failures)
    close("running var", running[0][1], running[1][1], failures)
    mean, invstd = merged[0]
    close("elemt", torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps),
          _CompositeKernels.batch_norm_elemt(x, weight, bias, mean, invstd, eps), failures)
    reduced = [impl.batch_norm_backward_reduce(dy, x, mean, invstd, weight, True, True, True)
               for impl in (torch, _CompositeKernels)]
    for index, name in enumerate(("sum_dy", "sum_dy_xmu", "grad_weight", "grad_bias")):
        close(name, reduced[0][index], reduced[1][index], failures)
    sum_dy, sum_dy_xmu = reduced[0][:2]
    count = torch.tensor([150, 144], dtype=torch.int32, device=device)
    close("backward elemt", torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count),
          _CompositeKernels.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count), failures)


def two_ranks(device: torch.device, failures: list[str]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator(device="cpu").manual_seed(1)
    batch = 7 * world + 3
    x = (torch.randn(batch, 4, 5, 5, generator=generator) * 2 - 1).to(device)
    dy = torch.randn(batch, 4, 5, 5, generator=generator).to(device)
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(4, momentum=0.2).to(device).train()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    converted = GlobalBatchNorm.convert(nn.BatchNorm2d(4, momentum=0.2).to(device)).train()
    converted.load_state_dict(reference.state_dict())
    bounds = [round(batch * (r + 1) ** 1.5 / world**1.5) for r in range(-1, world)]  # uneven slices
    rows = slice(bounds[rank], bounds[rank + 1])
    whole = x.clone().requires_grad_()
    expected = reference(whole)  # one train-mode BatchNorm on the whole batch (updates its running statistics once)
    (expected * dy).sum().backward()
    part = x[rows].clone().requires_grad_()
    out = converted(part)
    (out * dy[rows]).sum().backward()
    for grad in (converted.weight.grad, converted.bias.grad):
        dist.all_reduce(grad)
    if rank == 0:
        print(f"GlobalBatchNorm over {world} ranks (NCCL), slices {[bounds[r + 1] - bounds[r] for r in range(world)]}, "
              "vs one BatchNorm")
    expected = expected.detach()[rows]
    checks = (("output", out, expected), ("input grad", part.grad, whole.grad[rows]),
              ("weight grad", converted.weight.grad, reference.weight.grad),
              ("bias grad", converted.bias.grad, reference.bias.grad),
              ("running mean", converted.running_mean, reference.running_mean),
              ("running var", converted.running_var, reference.running_var))
    for name, got, want in checks:
        if rank == 0:
            close(name, got, want, failures)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device (torch's BatchNorm statistics kernels are CUDA-only)")
    failures: list[str] = []
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl", device_id=device)
        if dist.get_rank() == 0:
            kernels(device, failures)
        two_ranks(device, failures)
        dist.destroy_process_group()
    else:
        kernels(device, failures)
    if failures:
        sys.exit(f"MISMATCH: {', '.join(failures)}")


if __name__ == "__main__":
    main()
