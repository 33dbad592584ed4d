"""Cheaper second derivatives for convolution and eval-mode BatchNorm: a scoped op override.

Reverse-over-reverse HVPs differentiate each op's backward once more. PyTorch's double backward of
convolution (``_convolution_double_backward``) computes the weight term as an explicit convolution with
batch and channels swapped -- a 32x32 "kernel" and a 3x3 output for a ResNet-20 layer -- which cuDNN
runs at about 0.5 ms per call on an H100, 80% of a block-HVP sweep's GPU time (profiled,
bench/results/hvp_variants_h100.txt). Eval-mode BatchNorm's double backward is a composite of ~20
small ops per layer (40% of the sweep's CPU time), though the function is an affine map.

``efficient_double_backward()`` is a ``TorchFunctionMode``: while it is active, ``conv1d/2d/3d`` are
recorded as :class:`_Convolution`, whose backward is built from cuDNN's three convolution primitives
(forward, data gradient, weight gradient) and so is their derivative; eval-mode ``batch_norm`` is
recorded as ``x * scale + shift``. Same function, same first and second derivatives (tested against
PyTorch's own on random convolutions of every stride/padding/dilation/groups kind); only the graph
that autograd records differs. Only the forward that builds the gradient graph needs the mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


class efficient_double_backward(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's modes
    """Record convolutions and eval-mode BatchNorm with cheap double backwards (see module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS:
            converted = _convolution_arguments(_CONVOLUTIONS[func], *args, **kwargs)
            if converted is not None:
                inputs, weight, bias, geometry = converted
                out = _Convolution.apply(inputs, weight, geometry)
                if bias is not None:
                    out = out + bias.reshape(1, -1, *([1] * (out.dim() - 2)))
                return out
        elif func is F.batch_norm:
            affine = _eval_batch_norm(*args, **kwargs)
            if affine is not None:
                return affine
        return func(*args, **kwargs)


def _convolution_arguments(dims: int, inputs, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """(inputs, weight, bias, geometry) in aten.convolution's form, or None to leave the call alone
    (string padding, unbatched input)."""
    if isinstance(padding, str) or inputs.dim() != dims + 2:
        return None

    def expand(value) -> list[int]:
        return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * dims

    return inputs, weight, bias, (expand(stride), expand(padding), expand(dilation), int(groups))


def _forward(inputs: torch.Tensor, weight: torch.Tensor, geometry) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution(inputs, weight, None, stride, padding, dilation, False,
                                      [0] * len(stride), groups)


def _gradients(grad_output: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, geometry,
               mask: list[bool]) -> tuple[Any, Any, Any]:
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution_backward(grad_output, inputs, weight, None, stride, padding, dilation,
                                               False, [0] * len(stride), groups, mask + [False])


class _Convolution(torch.autograd.Function):
    """y = conv(x, W); backward through :class:`_DataGradient` and :class:`_WeightGradient`."""

    @staticmethod
    def forward(ctx, inputs, weight, geometry):
        ctx.save_for_backward(inputs, weight)
        ctx.geometry = geometry
        return _forward(inputs, weight, geometry)

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        grad_inputs = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_inputs = _DataGradient.apply(grad_output, weight, inputs.detach(), ctx.geometry)
        if ctx.needs_input_grad[1]:
            grad_weight = _WeightGradient.apply(grad_output, inputs, weight.detach(), ctx.geometry)
        return grad_inputs, grad_weight, None


class _DataGradient(torch.autograd.Function):
    """dL/dx = dgrad(g, W), bilinear in (g, W). ``shape_of`` only gives x's shape and layout."""

    @staticmethod
    def forward(ctx, grad_output, weight, shape_of, geometry):
        ctx.save_for_backward(grad_output, weight, shape_of)
        ctx.geometry = geometry
        return _gradients(grad_output, shape_of, weight, geometry, [True, False])[0]

    @staticmethod
    def backward(ctx, cotangent):
        grad_output, weight, shape_of = ctx.saved_tensors
        d_grad_output = d_weight = None
        if ctx.needs_input_grad[0]:
            d_grad_output = _forward(cotangent, weight, ctx.geometry)
        if ctx.needs_input_grad[1]:  # <c, dgrad(g, W)> = <W, wgrad(c, g)>
            d_weight = _gradients(grad_output, cotangent, weight, ctx.geometry, [False, True])[1]
        return d_grad_output, d_weight, None, None


class _WeightGradient(torch.autograd.Function):
    """dL/dW = wgrad(x, g), bilinear in (x, g). ``shape_of`` only gives W's shape."""

    @staticmethod
    def forward(ctx, grad_output, inputs, shape_of, geometry):
        ctx.save_for_backward(grad_output, inputs, shape_of)
        ctx.geometry = geometry
        return _gradients(grad_output, inputs, shape_of, geometry, [False, True])[1]

    @staticmethod
    def backward(ctx, cotangent):
        grad_output, inputs, shape_of = ctx.saved_tensors
        d_grad_output = d_inputs = None
        if ctx.needs_input_grad[0]:  # <C, wgrad(x, g)> = <g, conv(x, C)>
            d_grad_output = _forward(inputs, cotangent, ctx.geometry)
        if ctx.needs_input_grad[1]:  # ... = <x, dgrad(g, C)>
            d_inputs = _gradients(grad_output, inputs, cotangent, ctx.geometry, [True, False])[0]
        return d_grad_output, d_inputs, None, None


def _eval_batch_norm(inputs, running_mean, running_var, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5):
    """Eval-mode BatchNorm as a per-channel affine map (None: training mode, left to PyTorch)."""
    if training or running_mean is None or running_var is None:
        return None
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return inputs * scale.reshape(shape) + shift.reshape(shape)
