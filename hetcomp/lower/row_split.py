"""A layer whose output rows run on several tiers: each tier computes its rows, the outputs are put back in order.

``RowSplit`` holds one sub-module per tier (that tier's simulation of the layer restricted to its rows, or the
exact digital slice) and the row indices each computes. For a weight-static layer the rows are output
features (Linear: last dim) or output channels (Conv: dim 1); for a dynamic product ``a @ b`` they are the
columns of ``b`` (last dim of the result). With every simulator ideal it equals the original layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RowSplit(nn.Module):
    def __init__(self, parts: dict[str, nn.Module], rows: dict[str, list[int]], simulators: dict[str, str | None],
                 out_rows: int, dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.simulators = dict(simulators)
        self.out_rows, self.dim = out_rows, dim
        for tier, index in rows.items():
            self.register_buffer(f"rows_{tier}", torch.tensor(index, dtype=torch.long, device=device),
                                 persistent=False)

    def rows(self, tier: str) -> torch.Tensor:
        return getattr(self, f"rows_{tier}")

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        out = None
        for tier, part in self.parts.items():
            index = self.rows(tier)
            y = part(x) if other is None else part(x, other.index_select(-1, index))
            if out is None:
                shape = list(y.shape)
                shape[self.dim] = self.out_rows
                out = y.new_empty(shape)
            out.index_copy_(self.dim % y.dim(), index, y)
        return out


def slice_rows(module: nn.Module, index: list[int]) -> nn.Module:
    """A copy of a Linear/Conv keeping only output rows ``index``."""
    idx = torch.tensor(index, dtype=torch.long, device=module.weight.device)
    if isinstance(module, nn.Linear):
        sliced = nn.Linear(module.in_features, len(index), bias=module.bias is not None)
    elif isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1:
            raise ValueError("row-splitting a grouped convolution is not supported; assign it to one tier")
        sliced = type(module)(module.in_channels, len(index), module.kernel_size, module.stride, module.padding,
                              module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode)
    else:
        raise ValueError(f"cannot row-split a {type(module).__name__}")
    sliced = sliced.to(module.weight.device, module.weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(module.weight.index_select(0, idx))
        if module.bias is not None:
            sliced.bias.copy_(module.bias.index_select(0, idx))
    return sliced
