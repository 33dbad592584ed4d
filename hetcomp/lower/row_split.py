"""A layer whose output rows run on several tiers: each tier computes its rows, the outputs are put back in order.

``RowSplit`` holds one sub-module per tier (that tier's simulation of the layer restricted to its rows, or the
exact digital slice) and the row indices each computes. For a weight-static layer the rows are output
features (Linear: last dim) or output channels (Conv: dim 1); for a dynamic product ``a @ b`` they are the
columns of ``b`` (last dim of the result). A grouped convolution splits only in whole groups: a part is a
convolution over its groups, fed only their input channels (``inputs``). With every simulator ideal it
equals the original layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hetcomp.errors import ConfigError


class RowSplit(nn.Module):
    def __init__(self, parts: dict[str, nn.Module], rows: dict[str, list[int]], simulators: dict[str, str | None],
                 out_rows: int, dim: int, device: torch.device | str = "cpu",
                 inputs: dict[str, list[int]] | None = None) -> None:
        """``inputs``: per tier, the input channels (dim 1) its part reads (grouped convolutions); default all."""
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.simulators = dict(simulators)
        self.out_rows, self.dim = out_rows, dim
        self.selects_inputs = inputs is not None
        for tier, index in rows.items():
            self.register_buffer(f"rows_{tier}", torch.tensor(index, dtype=torch.long, device=device),
                                 persistent=False)
        for tier, index in (inputs or {}).items():
            self.register_buffer(f"inputs_{tier}", torch.tensor(index, dtype=torch.long, device=device),
                                 persistent=False)

    def rows(self, tier: str) -> torch.Tensor:
        return getattr(self, f"rows_{tier}")

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        out = None
        for tier, part in self.parts.items():
            index = self.rows(tier)
            if other is not None:
                y = part(x, other.index_select(-1, index))
            else:
                y = part(x.index_select(1, getattr(self, f"inputs_{tier}")) if self.selects_inputs else x)
            out = place_rows(out, y, index, self.dim, self.out_rows)
        return out


def place_rows(out: torch.Tensor | None, part: torch.Tensor, index: torch.Tensor, dim: int,
               out_rows: int) -> torch.Tensor:
    """``part``'s rows written at ``index`` along ``dim`` of the layer's output (allocated, ``out_rows`` along
    ``dim``, from the first part when ``out`` is None)."""
    if out is None:
        shape = list(part.shape)
        shape[dim] = out_rows
        out = part.new_empty(shape)
    return out.index_copy_(dim % part.dim(), index, part)


def whole_groups(module: nn.Module, index: list[int]) -> list[int]:
    """The groups of a convolution that rows ``index`` make up, in order; ConfigError unless they are whole
    groups, each group's rows together and in order (a group's rows share its input channels)."""
    groups = getattr(module, "groups", 1)
    size = module.weight.shape[0] // groups  # rows (output channels) per group
    chunks = [index[start : start + size] for start in range(0, len(index), size)]
    if any(len(chunk) != size or chunk[0] % size or chunk != list(range(chunk[0], chunk[0] + size))
           for chunk in chunks):
        raise ConfigError(f"rows {index[:8]}{'...' if len(index) > 8 else ''} of a convolution with {groups} groups "
                          f"are not whole groups of {size} rows; a grouped convolution is row-split in whole groups")
    return [chunk[0] // size for chunk in chunks]


def input_channels(module: nn.Module, index: list[int]) -> list[int] | None:
    """The input channels that output rows ``index`` read: those of their groups (None: all of them)."""
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return None
    per_group = module.weight.shape[1]  # input channels per group
    return [g * per_group + c for g in whole_groups(module, index) for c in range(per_group)]


def slice_rows(module: nn.Module, index: list[int]) -> nn.Module:
    """A copy of a Linear/Conv keeping only output rows ``index`` (whole groups of a grouped conv: the copy is a
    conv over just those groups, reading the input channels ``input_channels`` names)."""
    idx = torch.tensor(index, dtype=torch.long, device=module.weight.device)
    if isinstance(module, nn.Linear):
        sliced = nn.Linear(module.in_features, len(index), bias=module.bias is not None)
    elif isinstance(module, nn.Conv1d | nn.Conv2d):
        groups = len(whole_groups(module, index)) if module.groups > 1 else 1
        in_channels = module.in_channels // module.groups * groups
        sliced = type(module)(in_channels, len(index), module.kernel_size, module.stride, module.padding,
                              module.dilation, groups=groups, bias=module.bias is not None,
                              padding_mode=module.padding_mode)
    else:
        raise ConfigError(f"cannot row-split a {type(module).__name__}; assign the layer to one tier")
    sliced = sliced.to(module.weight.device, module.weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(module.weight.index_select(0, idx))
        if module.bias is not None:
            sliced.bias.copy_(module.bias.index_select(0, idx))
    return sliced
