"""Convolution patches (im2col) as strided views copied once, shared by every simulator that runs a
convolution as a matrix-vector product on its patches (aihwkit's PCM layers, the PIM/photonic tiers, the
repeat-vectorized PCM layer).

``conv_patches(x, ...)[n, i, j, :]`` is ``F.unfold(x, ...)[n, :, i * W' + j]``: the same values, columns in
unfold's (channel, kernel row, kernel column) order, rows in output-pixel order. It is not ``F.unfold`` because
torch's CUDA im2col launches one kernel per sample (a LAFT step of ResNet-20 at batch 256 launched about 5,000 of
them); here the forward is one copy and the backward two ``unfold_backward`` kernels, on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hetcomp.errors import DataError


def conv_patches(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> torch.Tensor:
    """Patches [N, H', W', C*kh*kw] of a zero-padded [N, C, H, W] input (see the module docstring)."""
    if x.dim() != 4:
        raise DataError(f"a convolution's patches need a batched [N, C, H, W] input, got shape {tuple(x.shape)}")
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    span_h, span_w = dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1
    windows = padded.unfold(2, span_h, stride[0]).unfold(3, span_w, stride[1])  # [N, C, H', W', span_h, span_w]
    if tuple(dilation) != (1, 1):  # a no-op slice would still cost a backward kernel
        windows = windows[..., :: dilation[0], :: dilation[1]]
    n, c, h, w = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(n, h, w, c * kernel[0] * kernel[1])
