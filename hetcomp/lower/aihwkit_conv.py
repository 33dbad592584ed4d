"""aihwkit's ``AnalogConv2d`` with its patches from ``conv_patches`` (hetcomp.lower.patches).

This module imports aihwkit; ``aihwkit_sim.lower_module`` imports it when it lowers a convolution, so that importing
hetcomp does not import aihwkit. The class is defined at module level so that lowered models pickle.
"""

from __future__ import annotations

import torch
from aihwkit.nn import AnalogConv2d

from hetcomp.lower.patches import conv_patches


class PatchedAnalogConv2d(AnalogConv2d):
    """``AnalogConv2d`` whose patches are one strided copy instead of ``F.unfold`` (on CUDA one im2col kernel per
    sample): the same values and shape (contiguous, where aihwkit hands the tile a transposed view), so the same
    outputs, gradients and noise draws (tested bit for bit on the CPU). aihwkit's indexed path (its C++ CUDA
    tiles) and unbatched inputs stay aihwkit's. aihwkit's ``convert_to_digital`` matches exact classes: give it
    ``{PatchedAnalogConv2d: nn.Conv2d}`` in its map, or read the digital weights with hetcomp's
    ``digital_state_dict``."""

    def forward(self, x_input: torch.Tensor) -> torch.Tensor:
        indexed = self.analog_module.is_cuda if self.use_indexed is None else self.use_indexed
        if indexed or x_input.dim() != 4:
            return super().forward(x_input)
        patches = conv_patches(x_input, self.kernel_size, self.stride, self.padding, self.dilation)
        out = self.analog_module(patches.flatten(1, 2)).transpose(-1, -2)  # [N, out, H'W'], as aihwkit's
        return out.reshape(x_input.shape[0], self.out_channels, patches.shape[1], patches.shape[2])
