"""BatchNorm over the global batch of a data-parallel fine-tuning stage, on CUDA and on the CPU.

Under torch.distributed each rank holds a slice of the global batch; BatchNorm normalizing by its slice trains a
different model than one process does. ``GlobalBatchNorm`` normalizes by the global batch, as torch's
``SyncBatchNorm`` does and with the same algorithm and collectives -- each rank's per-channel mean and inverse
standard deviation and its count are all-gathered and merged (Chan's parallel update, as one BatchNorm over the
whole batch), the running statistics updated with the unbiased global variance; in backward the per-channel sums of
dy and dy * (x - mean) are all-reduced -- with two differences:

- **No host synchronization.** torch's forward drops the statistics of ranks with an empty slice by a boolean mask
  (``count_all[mask]``), which waits for the all-gather on the host once per layer. Here every rank's slice must hold
  a sample, checked on the host from the shape: the fine-tuning stage guarantees it (``batch_size >= world``; a last
  batch smaller than the ranks is held whole by every rank). Measured alternating with torch's in one process on two
  H200s, a ResNet-20 LAFT step at global batch 256 took 118-127 ms against 130-156 ms, at 1,024 144-150 against
  151-158 ms (bench/results/laft_steps_h200x2.txt, call K).
- **The CPU too.** torch's statistics kernels (``torch.batch_norm_stats`` and the four others) exist only on CUDA;
  on any other device the same five kernels run as composite operations (``_CompositeKernels``, accumulated in
  float64), so the collectives and the merge are one code path, tested under gloo in CI;
  bench/check_batchnorm_kernels.py checks the composite kernels against torch's CUDA ones.

Outside training, or in one process, it is the BatchNorm it replaces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from hetcomp.errors import DataError


class _CompositeKernels:
    """torch's CUDA-only BatchNorm statistics kernels (same signatures and results) from composite operations, for
    devices without them. Reductions run in float64; statistics and sums come back in the input's dtype promoted to
    at least float32 (as torch's accumulate a half input's in float32), outputs and gradients in the input's."""

    @staticmethod
    def _stat_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    @staticmethod
    def _shape(x: torch.Tensor) -> list[int]:
        return [1, x.shape[1]] + [1] * (x.dim() - 2)

    @staticmethod
    def _dims(x: torch.Tensor) -> list[int]:
        return [0, *range(2, x.dim())]

    @classmethod
    def batch_norm_stats(cls, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        wide = x.double()
        var, mean = torch.var_mean(wide, dim=cls._dims(x), correction=0)
        return mean.to(cls._stat_dtype(x)), torch.rsqrt(var + eps).to(cls._stat_dtype(x))

    @classmethod
    def batch_norm_gather_stats_with_counts(cls, x: torch.Tensor, mean_all: torch.Tensor, invstd_all: torch.Tensor,
                                            running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                                            momentum: float, eps: float, counts: torch.Tensor
                                            ) -> tuple[torch.Tensor, torch.Tensor]:
        counts = counts.double()[:, None]  # [ranks, 1]
        total = counts.sum()
        means, variances = mean_all.double(), invstd_all.double().pow(-2) - eps
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).pow(2))).sum(0) / total
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_((var * total / (total - 1).clamp(min=1.0)).to(running_var.dtype), momentum)
        return mean.to(cls._stat_dtype(x)), torch.rsqrt(var + eps).to(cls._stat_dtype(x))

    @classmethod
    def batch_norm_elemt(cls, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         mean: torch.Tensor, invstd: torch.Tensor, eps: float) -> torch.Tensor:
        shape = cls._shape(x)
        out = (x - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            out = out * weight.view(shape)
        out = out + bias.view(shape) if bias is not None else out
        return out.to(x.dtype)

    @classmethod
    def batch_norm_backward_reduce(cls, dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                                   weight: torch.Tensor | None, input_g: bool, weight_g: bool, bias_g: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        dims, shape = cls._dims(x), cls._shape(x)
        sum_dy = dy.double().sum(dims)
        sum_dy_xmu = (dy.double() * (x.double() - mean.double().view(shape))).sum(dims)
        parameter_dtype = weight.dtype if weight is not None else x.dtype
        grad_weight = (sum_dy_xmu * invstd.double()).to(parameter_dtype) if weight_g else None
        grad_bias = sum_dy.to(parameter_dtype) if bias_g else None
        stat_dtype = cls._stat_dtype(x)
        return sum_dy.to(stat_dtype), sum_dy_xmu.to(stat_dtype), grad_weight, grad_bias

    @classmethod
    def batch_norm_backward_elemt(cls, dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                                  weight: torch.Tensor | None, sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor,
                                  counts: torch.Tensor) -> torch.Tensor:
        shape = cls._shape(x)
        total = counts.sum().double()
        invstd = invstd.double().view(shape)
        scale = invstd * (weight.double().view(shape) if weight is not None else 1.0)
        centered = x.double() - mean.double().view(shape)
        grad = (dy.double() - (sum_dy.double().view(shape) / total)
                - centered * invstd.pow(2) * (sum_dy_xmu.double().view(shape) / total)) * scale
        return grad.to(x.dtype)


def _kernels(x: torch.Tensor) -> Any:
    return torch if x.is_cuda else _CompositeKernels


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a layout the kernels read: as it is when contiguous or channels-last (as torch's SyncBatchNorm keeps
    it), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


class _GlobalBatchNormFunction(torch.autograd.Function):
    """torch's SyncBatchNorm function without the empty-rank mask (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float, momentum: float,
                group: Any) -> torch.Tensor:
        kernels = _kernels(x)
        x = _dense(x)
        weight = weight.contiguous() if weight is not None else None
        channels, world = x.shape[1], dist.get_world_size(group)
        mean, invstd = kernels.batch_norm_stats(x, eps)
        count = torch.full((1,), x.numel() // channels, dtype=mean.dtype, device=x.device)
        combined = torch.cat([mean, invstd, count])  # [2C + 1]
        if not x.is_cuda or dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(combined) for _ in range(world)]
            dist.all_gather(parts, combined, group=group)
            gathered = torch.stack(parts)
        else:
            gathered = combined.new_empty(world, combined.numel())
            dist.all_gather_into_tensor(gathered, combined, group=group)
        mean_all, invstd_all, count_all = torch.split(gathered, channels, dim=1)
        counts = count_all.reshape(-1)
        if running_mean is not None and counts.dtype != running_mean.dtype:
            counts = counts.to(running_mean.dtype)
        mean, invstd = kernels.batch_norm_gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var,
                                                                   momentum, eps, counts)
        ctx.save_for_backward(x, weight, mean, invstd, count_all.reshape(-1).to(torch.int32))
        ctx.group = group
        return kernels.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, counts = ctx.saved_tensors
        kernels = _kernels(x)
        grad_output = _dense(grad_output)
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = kernels.batch_norm_backward_reduce(
            grad_output, x, mean, invstd, weight, needs_input, needs_weight, needs_bias)
        grad_input = None
        if needs_input:
            channels = sum_dy.shape[0]
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, group=ctx.group)
            sum_dy, sum_dy_xmu = torch.split(combined, channels)
            if weight is not None and weight.dtype != mean.dtype:
                weight = weight.to(mean.dtype)
            grad_input = kernels.batch_norm_backward_elemt(grad_output, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                                           counts)
        # The parameters' gradients stay this rank's: DistributedDataParallel averages them with the others.
        return (grad_input, grad_weight if weight is not None and needs_weight else None,
                grad_bias if weight is not None and needs_bias else None, None, None, None, None, None)


class GlobalBatchNorm(_BatchNorm):
    """A BatchNorm layer (any of 1d/2d/3d) normalizing by the global batch under torch.distributed (module
    docstring). Build it with ``convert``, which keeps the replaced layer's parameters and buffers."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise DataError(f"BatchNorm needs an input of at least 2 dimensions (batch, channels, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() == 0:  # the other ranks then wait in the all-gather until the process group's timeout
            raise DataError("GlobalBatchNorm got an empty slice on this rank: every rank must hold at least one sample "
                            "of each global batch (use a global batch of at least the number of ranks)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average, as BatchNorm's
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats
        return _GlobalBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean if tracked else None,
                                              self.running_var if tracked else None, self.eps, factor,
                                              dist.group.WORLD)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every BatchNorm1d/2d/3d (and SyncBatchNorm) replaced by a GlobalBatchNorm holding the same
        Parameter and buffer objects (an optimizer built before keeps working); ``module`` itself when it is one."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(converted, name, getattr(module, name))
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            replaced = cls.convert(child)
            if replaced is not child:
                module.add_module(name, replaced)
        return module
