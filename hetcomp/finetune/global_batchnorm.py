"""BatchNorm over the global batch of a data-parallel fine-tuning stage on the CPU, where torch has no SyncBatchNorm.

Under torch.distributed each rank holds a slice of the global batch; BatchNorm normalizing by its slice trains a
different model than one process does. torch's ``SyncBatchNorm`` normalizes by the global batch, but only on CUDA
(its statistics kernels are CUDA-only). ``GlobalBatchNorm`` computes the same statistics from sums all-reduced
through an autograd-aware all-reduce (``_AllReduceSum``: its backward sums the ranks' gradients, as
SyncBatchNorm's backward does), in two passes (mean, then the centered variance) accumulated in float64, so a rank
with no samples simply adds nothing. The running statistics are updated as BatchNorm would on the global batch
(unbiased variance over the global count). Outside training, or in one process, it is the BatchNorm it replaces.

It runs on CUDA too, but there the stage uses torch's SyncBatchNorm: its fused kernels and two collectives per
layer made a ResNet-20 step on two H200s faster (96-100 ms at global batch 256, 137 ms at 1,024) than this
layer's composite operations and four all-reduces (116 and 150 ms; bench/results/laft_steps_h200x2.txt, call H),
although SyncBatchNorm's forward synchronizes the host once per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from hetcomp.errors import DataError


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks, differentiable: the gradient of every rank's share is the sum of the ranks' gradients
    of the total (synchronous collectives; torch.distributed.nn's ``all_reduce`` is deprecated)."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


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
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        local_count = x.new_full((1,), x.numel() // max(channels, 1), dtype=torch.float64)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims, dtype=torch.float64), local_count]))
        count = sums[-1].detach()
        mean = sums[:channels] / count
        centered = x - mean.to(x.dtype).view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims, dtype=torch.float64)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(x.dtype), factor)
                self.running_var.lerp_((var * count / (count - 1).clamp(min=1.0)).to(x.dtype), factor)
        out = centered * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

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
