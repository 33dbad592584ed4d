"""hetcomp's aihwkit layers: aihwkit's ``AnalogLinear`` and ``AnalogConv2d`` with a batched train-mode forward and,
for the convolution, patches from ``conv_patches`` (hetcomp.lower.patches).

- In train mode (LAFT) a layer runs all its tiles in one call (``hetcomp.lower.aihwkit_train.train_forward``)
  instead of aihwkit's tile-by-tile forward; a layer whose tiles use a setting that forward does not reproduce keeps
  aihwkit's (``aihwkit_train.unsupported``, checked once per layer: hetcomp does not change a lowered tile's
  rpu_config).
- In eval mode the layers are aihwkit's, except that the convolution forms its patches as one strided copy instead
  of ``F.unfold`` (on CUDA one im2col kernel per sample): the same values and shape, so the same outputs and noise
  draws (tested bit for bit).

This module imports aihwkit; ``aihwkit_sim.lower_module`` imports it when it lowers a layer, so that importing
hetcomp does not import aihwkit. The classes are defined at module level so that lowered models pickle. aihwkit's
``convert_to_digital`` matches exact classes: give it ``{BatchedAnalogLinear: nn.Linear, BatchedAnalogConv2d:
nn.Conv2d}`` in its map, or read the digital weights with hetcomp's ``digital_state_dict``.
"""

from __future__ import annotations

import torch
from aihwkit.nn import AnalogConv2d, AnalogLinear

from hetcomp.lower.aihwkit_train import batched_training, train_forward
from hetcomp.lower.patches import conv_patches


class BatchedAnalogLinear(AnalogLinear):
    """``AnalogLinear`` whose train-mode forward runs all its tiles at once (module docstring)."""

    def forward(self, x_input: torch.Tensor) -> torch.Tensor:
        if batched_training(self):
            return train_forward(self, x_input)
        return super().forward(x_input)


class BatchedAnalogConv2d(AnalogConv2d):
    """``AnalogConv2d`` with its patches from ``conv_patches`` and a train-mode forward that runs all its tiles at
    once (module docstring). aihwkit's indexed path (its C++ CUDA tiles) and unbatched inputs stay aihwkit's."""

    def forward(self, x_input: torch.Tensor) -> torch.Tensor:
        indexed = self.analog_module.is_cuda if self.use_indexed is None else self.use_indexed
        if indexed or x_input.dim() != 4:
            return super().forward(x_input)
        patches = conv_patches(x_input, self.kernel_size, self.stride, self.padding, self.dilation)
        rows = patches.flatten(1, 2)  # [N, H'W', C*kh*kw]
        out = train_forward(self, rows) if batched_training(self) else self.analog_module(rows)
        out = out.transpose(-1, -2)  # [N, out, H'W'], as aihwkit's
        return out.reshape(x_input.shape[0], self.out_channels, patches.shape[1], patches.shape[2])
