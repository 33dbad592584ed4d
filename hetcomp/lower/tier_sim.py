"""Torch simulations of the H3PIMAP tiers: PIM crossbars (SRAM, ReRAM) and photonic tensor cores.

Every simulator reads its parameters from ``target.device`` (data, checked by the ``Simulator`` subclasses at
the end of this file) and draws its noise from torch's RNG, so a seeded evaluation is reproducible and runs on
whatever device the model is on.

``pim-crossbar`` (ISAAC-style bit-serial, bit-sliced): inputs and weights are quantized symmetrically per
tensor to ``input_bits`` / ``weight_bits`` (sign-magnitude: positive and negative parts run separately, as
differential arrays do); weight magnitudes are sliced into ``cell_bits`` cells; each crossbar of
``xbar_rows`` rows sums one input bit-plane times one cell slice, and the ADC digitizes that column sum with
a one-level LSB (one cell level times one input bit), saturating at ``2^adc_bits - 1``: exact for noise-free
sums that fit (SRAM's 7-bit ADC clips a full 128-row column at 127; ReRAM's 8-bit ADC saturates sums above
255 of the 384 possible), and analog noise smaller than half a level is rounded away, as on the chip.
Shift-and-add recombines. With
``conductance_noise`` (ReRAM, H3PIMAP Eq. 1) every cell's conductance gets fresh Gaussian noise of std
``sqrt(G f (4kT + 2qV)) / V`` on every forward (thermal and shot noise are read noise).

``photonic`` (TeMPO): both operands quantized to ``input_bits`` / ``weight_bits``, each perturbed by
relative Gaussian noise ``N(0, (sigma |x|)^2)`` (H3PIMAP §III-C), the product quantized to ``output_bits``.

Both lower Linear, Conv1d and Conv2d; a grouped or depthwise convolution gets one core (array) per group.
``IDEAL`` switches every simulator here to the exact float layer (for equivalence checks).

Noise is drawn in each tensor's logical (row-major) order (``standard_normal``), and a read's ReRAM noise is
``read_sigma x N(0, 1)`` in digit units. **Hardware repeats** run vectorized (``Simulator.repeated``,
hetcomp.lower.tier_repeats): the functions here take an optional leading repeat dimension (``quantize`` and
``output_quantize`` with ``per_repeat``, ``crossbar_integers`` with per-repeat noise, ``PhotonicCore._operand``
with a per-repeat ``randn``), so repeat r computes exactly this module's forward for its own noise draw.

**Quantization-aware training (LSQ, Esser et al. 2020).** Both cores train (``trainable``): in training mode each
quantized operand has a learned step size ``s`` (an ``nn.Parameter``: ``input_step``, ``weight_step``, and
``other_step`` for the second activation of a dynamic product), quantized as LSQ does,
``q = round(clip(v / s, -Qp, Qp))`` with ``Qp = 2^(bits-1) - 1`` (symmetric: sign-magnitude arrays), rounding
passed straight through (``dq/dv = 1/s`` inside the range, 0 where clipped) and the step's gradient scaled by
``g = 1 / sqrt(numel x Qp)`` (numel: the elements that step quantizes in that call, the batch included for
an input). The steps are set on the first training-mode forward (``lsq_ready``): to today's per-tensor scale
``max|v| / Qp`` (``step_init="max-abs"``, the default: fine-tuning starts exactly at the post-training-quantized
model) or to LSQ's ``2 mean|v| / sqrt(Qp)`` (``step_init="lsq"``, a device setting). Everything else (cells,
ADC, noise draws, the bit-serial path) is computed as before from those integers, so at steps equal to today's
scales the forward is bit for bit today's. Backward: the PIM crossbar is one straight-through estimator as a
whole (the gradient of ``x_q @ w_q^T`` w.r.t. the integer operands, times the exact digital rescale; ADC
clipping/rounding and read noise act in the forward only); the photonic core's noise is differentiated as
drawn and its output quantizer is passed straight through.

Steps stay positive, and a weight step at most ``max|W| / Qp`` (a larger one clips nothing and only coarsens the
grid): projected gradient descent, the parameter clamped into range before a training forward uses it.

What persists: no step. The digital weight read back (``float_weight``, ``digital_weights``) is ``W`` clipped at
``+-Qp x s_w``, so lowering that weight again derives exactly the learned step (its max-abs scale; the core uses
the step its clipping bound implies, which float arithmetic makes differ from ``s_w`` by at most an ulp) and the
same integer weights: weight steps are lowering-time state derived from the weights. Input steps are training-time
state: in eval mode a core quantizes its inputs per call by ``max|x| / Qp`` as before (what a freshly lowered
layer does), so the accuracy that LAFT validates on the module it trains is the accuracy of the compiled model
it returns. ``learned_input_steps()`` makes eval use the learned input steps too, to measure what persisting
them would add (bench/lsq_tiers.py: nothing at 6 and 8 bits, up to 7 points at 3-4 bits).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetcomp.errors import ConfigError
from hetcomp.lower.patches import conv_patches
from hetcomp.lower.simulator import Simulator
from hetcomp.targets.base import Target

_IDEAL = [False]
_LEARNED_INPUTS = [False]
STEP_INITS = ("max-abs", "lsq")
BOLTZMANN = 1.380649e-23
ELECTRON_CHARGE = 1.602176634e-19


@contextlib.contextmanager
def ideal() -> Iterator[None]:
    """Inside this block every torch tier simulator computes the exact float result (no quantization, no noise)."""
    _IDEAL[0] = True
    try:
        yield
    finally:
        _IDEAL[0] = False


@contextlib.contextmanager
def learned_input_steps() -> Iterator[None]:
    """Inside this block a trained core quantizes its inputs with its learned (LSQ) input steps in eval mode too,
    instead of by each call's max-abs; for measuring what persisting input steps would add."""
    _LEARNED_INPUTS[0] = True
    try:
        yield
    finally:
        _LEARNED_INPUTS[0] = False


def quantize(x: torch.Tensor, bits: int | None, per_repeat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor quantization: (integer-valued tensor, scale); bits None -> (x, 1). ``per_repeat``: dim 0
    indexes hardware repeats and each repeat is its own tensor (scale [R, 1, ...], the max over that repeat only),
    so repeat r gets exactly what quantizing its slice alone gives."""
    if bits is None:
        return x, torch.ones((), device=x.device, dtype=x.dtype)
    levels = 2 ** (bits - 1) - 1
    scale = _abs_max(x.detach(), per_repeat).clamp_min(1e-12) / levels
    return (x / scale).round_().clamp_(-levels, levels), scale


def _abs_max(x: torch.Tensor, per_repeat: bool) -> torch.Tensor:
    """max|x| (per repeat: [R, 1, ...]) as max(max x, -min x): exactly max|x|, without an |x| temporary (and
    torch's reductions over trailing dims are several times faster as amax/amin than on |x| or as aminmax)."""
    if per_repeat:
        dims = tuple(range(1, x.dim()))
        return torch.maximum(x.amax(dim=dims, keepdim=True), -x.amin(dim=dims, keepdim=True))
    return torch.maximum(x.max(), -x.min())


def _bit_planes(magnitude: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """[slices, ...] digits of ``width`` bits of an integer-valued magnitude, least significant first."""
    slices = math.ceil(bits / width)
    base = 2**width
    value = magnitude.to(torch.int64)
    return torch.stack([((value >> (width * s)) % base).to(magnitude.dtype) for s in range(slices)])


class _GradScale(torch.autograd.Function):
    """The identity on the value; the gradient times ``g`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx: Any, step: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return step.view_as(step)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


class _Bounded(torch.autograd.Function):
    """``step`` clamped to [floor, cap] on the value, the gradient passed to ``step`` unchanged. In training the
    parameter is projected into that range before use (``_LearnedSteps._step``), so the clamp only acts in eval,
    on a step that the last optimizer update moved out of range. With ``levels`` (a weight step) a step below the
    cap is the one its clipping bound implies, ``(step x levels) / levels`` in float arithmetic (the same value
    up to an ulp): exactly the max-abs scale that lowering derives from the weight clipped at that bound."""

    @staticmethod
    def forward(ctx: Any, step: torch.Tensor, floor: torch.Tensor, cap: torch.Tensor | None,
                levels: int | None = None) -> torch.Tensor:
        step = torch.maximum(step, floor)
        if cap is None:
            return step
        step = torch.minimum(step, cap)
        return step if levels is None else torch.where(step < cap, torch.minimum(step * levels / levels, cap), cap)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


class _LSQRound(torch.autograd.Function):
    """q = round(clip(v / s, -Qp, Qp)), integer-valued, computed exactly as ``quantize`` does; LSQ's backward:
    dq/dv = 1/s and dq/ds = -v/s^2 strictly inside (-Qp, Qp) (rounding passed straight through), 0 where clipped.
    With the caller's ``q * s`` this gives LSQ's d(qs)/ds = round(v/s) - v/s inside and +-Qp where clipped."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
        ratio = v / step
        ctx.save_for_backward(ratio, step)
        ctx.levels = levels
        return torch.round(ratio).clamp(-levels, levels)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        ratio, step = ctx.saved_tensors
        inside = (ratio > -ctx.levels) & (ratio < ctx.levels)
        grad = torch.where(inside, grad, torch.zeros_like(grad))
        grad_v = grad / step if ctx.needs_input_grad[0] else None
        grad_step = (-(grad * ratio).sum() / step).reshape(step.shape) if ctx.needs_input_grad[1] else None
        return grad_v, grad_step, None


class _CrossbarProduct(torch.autograd.Function):
    """``out * scale`` (the crossbar's integer result, rescaled: its value exactly as the forward computed it);
    backward: the straight-through estimator of the whole crossbar, out ~ xq @ wq^T, so
    d/dxq = (G scale) wq, d/dwq = (G scale)^T xq, and d/dscale = sum(G out) (the rescale is exact)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(out, xq, wq, scale)
        return out * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None,
                                                        torch.Tensor | None]:
        out, xq, wq, scale = ctx.saved_tensors
        scaled = grad * scale
        grad_x = scaled @ wq if ctx.needs_input_grad[1] else None
        grad_w = scaled.t() @ xq if ctx.needs_input_grad[2] else None
        grad_scale = (grad * out).sum().reshape(scale.shape) if ctx.needs_input_grad[3] else None
        return None, grad_x, grad_w, grad_scale


class _OutputQuantize(torch.autograd.Function):
    """``quantize(y, bits)`` rescaled (per call, max-abs: nothing clips), its rounding passed straight through."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, bits: int | None) -> torch.Tensor:
        return output_quantize(y, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def output_quantize(y: torch.Tensor, bits: int | None, per_repeat: bool = False, inplace: bool = False
                    ) -> torch.Tensor:
    """A photonic core's output quantizer (per call, max-abs: nothing clips), rescaled; ``per_repeat`` as in
    ``quantize``. ``inplace``: overwrite ``y`` (a tensor of the caller's own) with the same values."""
    if bits is None:
        return y
    if inplace:
        levels = 2 ** (bits - 1) - 1
        scale = _abs_max(y, per_repeat).clamp_min(1e-12) / levels
        return y.div_(scale).round_().clamp_(-levels, levels).mul_(scale)
    q, scale = quantize(y, bits, per_repeat)
    return q.mul_(scale)  # q is a fresh tensor: rescaled in place


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _step_init(v: torch.Tensor, bits: int, how: str) -> torch.Tensor:
    """A step for ``v`` at ``bits``: today's per-tensor scale (``max-abs``) or LSQ's 2 mean|v| / sqrt(Qp)."""
    levels = _levels(bits)
    if how == "lsq":
        return (2 * v.detach().abs().mean() / math.sqrt(levels)).clamp_min(1e-12)
    return v.detach().abs().max().clamp_min(1e-12) / levels


class _LearnedSteps(nn.Module):
    """LSQ state shared by the cores: learned step sizes (one per quantized operand), set on the first training
    forward, and the digital weight they imply (``float_weight``)."""

    # operand name -> settings key of its bits
    OPERANDS: dict[str, str] = {}

    def _init_steps(self, weight: torch.Tensor | None, operands: tuple[str, ...]) -> None:
        self.lsq_ready = False  # a plain attribute (not a buffer): read on every forward without a device sync
        self._operands = tuple(name for name in operands if self.settings[self.OPERANDS[name]] is not None)
        dtype = torch.float32 if weight is None else weight.dtype
        device = None if weight is None else weight.device
        for name in self._operands:
            setattr(self, f"{name}_step", nn.Parameter(torch.ones((), dtype=dtype, device=device)))

    @property
    def learned(self) -> bool:
        return self.lsq_ready

    def _start_training(self, values: dict[str, torch.Tensor]) -> None:
        """Set every step from its operand's values in this (first training) call; the same on every rank."""
        how = self.settings.get("step_init", "max-abs")
        with torch.no_grad():
            for name in self._operands:
                step = _step_init(values[name], self.settings[self.OPERANDS[name]], how)
                if name != "weight" and torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
                getattr(self, f"{name}_step").copy_(step)
            self.lsq_ready = True

    def _step(self, name: str) -> torch.Tensor:
        """Operand ``name``'s learned step, kept positive and, for the weight, at most today's scale max|W| / Qp
        (a larger step clips nothing and only coarsens the grid): projected gradient descent, the parameter
        clamped into [floor, cap] before a training forward uses it (only when an update moved it out, so an
        in-range step is never written), and clamped on the value in eval."""
        step = getattr(self, f"{name}_step")
        if name == "weight":
            cap = _step_init(self.weight, self.settings["weight_bits"], "max-abs")
            floor, levels = cap * 1e-3, _levels(self.settings["weight_bits"])
        else:
            cap, floor, levels = None, torch.full_like(step, 1e-12), None
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                if step < floor or cap is not None and step > cap:
                    step.copy_(_Bounded.apply(step, floor, cap))
        return _Bounded.apply(step, floor, cap, levels)

    def _lsq(self, name: str, v: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer-valued v, its step), both carrying LSQ's gradients."""
        levels = _levels(self.settings[self.OPERANDS[name]])
        step = _GradScale.apply(step, 1.0 / math.sqrt(v.numel() * levels))
        return _LSQRound.apply(v, step, levels), step

    def _quantize(self, name: str, v: torch.Tensor, per_repeat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Operand ``name``: learned step in training (and for weights once learned), else ``quantize``.
        ``per_repeat``: dim 0 of ``v`` indexes hardware repeats, each quantized by its own max-abs (a learned step
        is one number: the same for every repeat)."""
        bits = self.settings[self.OPERANDS[name]]
        if bits is None or not self.learned:
            return quantize(v, bits, per_repeat)
        if name == "weight" or self.training or _LEARNED_INPUTS[0]:
            return self._lsq(name, v, self._step(name))
        return quantize(v, bits, per_repeat)  # eval: inputs by each call's max-abs, as a freshly lowered core

    def float_weight(self) -> torch.Tensor:
        """The digital weight this core computes: the weight clipped at its learned range (+-Qp x step), so that
        lowering it again derives the same step and integers; the weight itself until LSQ has moved the step
        below max|W| / Qp."""
        bits = self.settings["weight_bits"]
        if not self.learned or bits is None:
            return self.weight
        with torch.no_grad():
            cap = _step_init(self.weight, bits, "max-abs")
            if self._step("weight") == cap:
                return self.weight
            # the bound whose max-abs scale is the step used (_Bounded): below max|W|, so some weight sits on it
            bound = torch.clamp(self.weight_step, cap * 1e-3, cap) * _levels(bits)
        return self.weight.clamp(-bound, bound)


class PimCrossbarCore(_LearnedSteps):
    """y = x W^T (+ b) through bit-serial, bit-sliced crossbars with per-column ADC quantization."""

    OPERANDS = {"input": "input_bits", "weight": "weight_bits"}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, settings: dict[str, Any]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.settings = dict(settings)
        self._init_steps(self.weight, ("input", "weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The crossbar result, computed exactly but not bit by bit where that cannot change it.

        A crossbar column's ADC read of one input bit-plane is the identity when its sum can neither saturate nor
        be moved by noise: its cells sum to at most ``saturation`` for any input plane (``(2^dac - 1) x the sum of
        the column's cells``) and the noise summed over its rows is under half a level. Such (array, slice, chunk,
        column) blocks add ``xq @ (their cells)`` exactly, so they are folded into one effective integer weight and
        computed by one matmul of the layer's own size; only output columns with a block that could clip or round
        go through the bit-serial path (``_bit_serial``), with their other blocks zeroed. The noise is drawn
        exactly as before (same shapes, same order), so a seeded forward gives what the all-bit-serial one did.

        In training the integers come from LSQ's learned steps (the module docstring) and the backward is the
        straight-through estimator of the whole crossbar (``_CrossbarProduct``): the value is this exact result,
        the gradient that of ``xq @ wq^T`` times the rescale, passed on to x, W and the steps by LSQ.
        """
        if _IDEAL[0]:
            return F.linear(x, self.float_weight(), self.bias)
        s = self.settings
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.training and not self.learned:
            self._start_training({"input": x2, "weight": self.weight})
        xq_graph, x_scale = self._quantize("input", x2)  # xq_graph / wq carry LSQ's gradients in training
        wq, w_scale, digits = self._cells()
        xq = xq_graph.detach()
        noise = s.get("conductance_noise")
        read = read_sigma(digits, 2 ** s["cell_bits"] - 1, noise) * standard_normal(digits) if noise else None
        out = crossbar_integers(xq, digits, read, s)
        scale = x_scale * w_scale
        if torch.is_grad_enabled() and (xq_graph.requires_grad or wq.requires_grad or scale.requires_grad):
            y = _CrossbarProduct.apply(out, xq_graph, wq, scale)  # the same value; a straight-through backward
        else:
            y = out * scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)

    def _cells(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integer weight, weight step, programmed cell digits); the digits are kept until the weight or its step
        changes (they are deterministic; noise is per read). Before LSQ training: today's per-tensor scale."""
        if self.learned:
            wq, w_scale = self._quantize("weight", self.weight)
            key = (self.weight.data_ptr(), self.weight._version, self.weight_step._version, True, self.weight.device,
                   self.weight.dtype)
            if getattr(self, "_cell_cache", (None,))[0] != key:
                self._cell_cache = (key, None, _cell_digits(wq.detach(), self.settings), None)
            return wq, w_scale, self._cell_cache[2]
        key = (self.weight.data_ptr(), self.weight._version, False, self.weight.device, self.weight.dtype)
        if getattr(self, "_cell_cache", (None,))[0] != key:
            self._cell_cache = (key, *_weight_cells(self.weight.detach(), self.settings))
        return self._cell_cache[3], self._cell_cache[1], self._cell_cache[2]


def crossbar_integers(xq: torch.Tensor, digits: torch.Tensor, noise: torch.Tensor | None, s: dict[str, Any]
                      ) -> torch.Tensor:
    """The crossbar's integer result (before the digital rescale) for integer-valued inputs: ``xq`` [N, K] read
    through cells ``digits`` [2 arrays, slices, R, K] plus this read's noise in digit units (``noise``, same shape;
    None: noise-free), or, for R hardware repeats at once, ``xq`` [R, N, K] (or [N, K] shared) with repeat r's
    ``noise`` [R, 2, slices, R_out, K]. [N, R_out] or [R, N, R_out].

    A crossbar column's ADC read of one input bit-plane is the identity when its sum can neither saturate nor be
    moved by noise: its cells sum to at most ``saturation`` for any input plane (``(2^dac - 1) x the sum of the
    column's cells``) and the noise summed over its rows is under half a level. Such (array, slice, chunk,
    column) blocks add ``xq @ (their cells)`` exactly, so they are folded into one effective integer weight and
    computed by one matmul of the layer's own size; only output columns with a block that could clip or round
    go through the bit-serial path (``_bit_serial``) on their noisy cells, with their other blocks zeroed. With
    repeats, a block safe in every repeat keeps one shared effective weight (the usual case: the noise is
    rounded away); otherwise each repeat gets its own, and the bit-serial columns are those any repeat needs (a
    column safe in repeat r reads only zeroed blocks there: it adds exactly 0)."""
    repeated = noise is not None and noise.dim() == 5
    if xq.dim() == 3 and not repeated:  # repeats over the same cells: they are just more rows
        return crossbar_integers(xq.reshape(-1, xq.shape[-1]), digits, noise, s).view(*xq.shape[:2], -1)
    cell_bits, rows = s["cell_bits"], s["xbar_rows"]
    k = xq.shape[-1]
    chunks = math.ceil(k / rows)
    pad = chunks * rows - k

    def blocks(t: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., chunks, rows] (zero rows padded)
        return (F.pad(t, (0, pad)) if pad else t).view(*t.shape[:-1], chunks, rows)

    slices, out_rows = digits.shape[1], digits.shape[2]
    lead = noise.shape[:-4] if repeated else ()  # (R,) or ()
    saturation = float(2 ** s["adc_bits"] - 1)
    top = float(2 ** s["dac_bits"] - 1)  # the largest input plane value
    blocked = blocks(digits)
    safe = top * blocked.sum(-1) <= saturation  # [2, S, R, C]: no input can saturate the column sum
    if noise is not None:
        # [(R,) 2, S, R, C]: the noise can never move the sum to another ADC level
        safe = safe & (top * blocks(noise.abs()).sum(-1) < 0.5)
    if repeated and xq.dim() == 2:  # a shared input read through each repeat's cells
        xq = xq.expand(lead[0], *xq.shape)
    shared_safe = safe[0] if safe.dim() == 5 and bool((safe == safe[:1]).all()) else safe
    significance = (torch.tensor([1.0, -1.0], dtype=xq.dtype).view(2, 1)
                    * 2.0 ** (cell_bits * torch.arange(slices, dtype=xq.dtype))).to(xq.device)  # [2, S]
    effective = (blocked * (shared_safe.to(xq.dtype) * significance[:, :, None, None])[..., None]).sum((-5, -4))
    effective = effective.reshape(*effective.shape[:-2], -1)[..., :k]  # [(R,) R_out, K]
    if effective.dim() == 2 and repeated:  # one effective weight for every repeat: one matmul over all rows
        out = (xq.reshape(-1, k) @ effective.t()).view(*xq.shape[:-1], out_rows)
    else:
        out = xq @ effective.transpose(-1, -2)
    unsafe = (~safe).any(-1).flatten(0, -2).any(0).nonzero().flatten()  # output columns that need the ADC
    if len(unsafe):
        cells = blocked[:, :, unsafe]  # this read's cells of those columns: digits + noise
        if noise is not None:
            cells = cells + blocks(noise[..., unsafe, :])
        masked = cells * (~safe[..., unsafe, :]).to(xq.dtype)[..., None]  # a zeroed block reads 0: adds nothing
        masked = masked.reshape(*masked.shape[:-2], -1)[..., :k]
        if repeated:  # each repeat through its own read of the cells
            for r in range(lead[0]):
                out[r][:, unsafe] += _bit_serial(xq[r], masked[r], s)
        else:
            out[:, unsafe] += _bit_serial(xq, masked, s)
    return out


def _weight_cells(weight: torch.Tensor, s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight scale, cell digits [2 arrays, slices, R, K], integer weight) of a weight quantized to
    ``weight_bits``."""
    wq, w_scale = quantize(weight, s["weight_bits"])
    return w_scale, _cell_digits(wq, s), wq


def _cell_digits(wq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Cell digits [2 arrays, slices, R, K] of an integer-valued weight (sign-magnitude, ``cell_bits`` per cell)."""
    magnitude_bits, cell_bits = s["weight_bits"] - 1, s["cell_bits"]
    return torch.stack([_bit_planes(wq.clamp(min=0), magnitude_bits, cell_bits),
                        _bit_planes((-wq).clamp(min=0), magnitude_bits, cell_bits)])


def _bit_serial(xq: torch.Tensor, cells: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Integer-valued inputs [N, K] through cells [2 arrays, slices, R, K], bit-plane by bit-plane: each crossbar
    (``xbar_rows`` rows) sums one input plane times one cell slice, the ADC rounds and saturates that column sum,
    shift-and-add recombines. [N, R]."""
    rows = s["xbar_rows"]
    k = xq.shape[-1]
    chunks = math.ceil(k / rows)
    pad = chunks * rows - k
    slices, out_rows = cells.shape[1], cells.shape[2]
    # [C, rows, 2*S*R]: each crossbar chunk's cells, both arrays and every slice side by side.
    cells = F.pad(cells, (0, pad)).reshape(2 * slices, -1, chunks, rows).permute(2, 3, 0, 1)
    cells = cells.reshape(chunks, rows, -1)
    # Input bit-planes of both signs at once: [P = 2 * B_in, N, C, rows].
    input_bits, dac_bits = s["input_bits"] - 1, s["dac_bits"]
    planes = torch.cat([_bit_planes(xq.clamp(min=0), input_bits, dac_bits),
                        _bit_planes((-xq).clamp(min=0), input_bits, dac_bits)])
    per_sign = planes.shape[0] // 2
    planes = F.pad(planes, (0, pad)).reshape(planes.shape[0], -1, chunks, rows)
    # Shift-and-add weights of each (input sign, bit) and each (array sign, cell slice) column sum.
    dtype, device = xq.dtype, xq.device
    plane_weight = torch.cat([2.0 ** (dac_bits * torch.arange(per_sign, dtype=dtype)),
                              -(2.0 ** (dac_bits * torch.arange(per_sign, dtype=dtype)))]).to(device)
    cell_weight = (torch.tensor([1.0, -1.0], dtype=dtype).view(2, 1)
                   * 2.0 ** (s["cell_bits"] * torch.arange(slices, dtype=dtype))).flatten().to(device)
    saturation = float(2 ** s["adc_bits"] - 1)
    out = xq.new_empty(xq.shape[0], out_rows)
    # One batched matmul per block of samples (every bit-plane, slice and crossbar chunk at once), the ADC
    # applied to each crossbar's column sum; blocks bound the [C, P*n, 2*S*R] partial sums to ~64 MB.
    block = max(1, (16 << 20) // max(1, chunks * planes.shape[0] * cells.shape[-1]))
    for start in range(0, xq.shape[0], block):
        part = planes[:, start : start + block]  # [P, n, C, rows]
        n = part.shape[1]
        sums = torch.bmm(part.permute(2, 0, 1, 3).reshape(chunks, -1, rows), cells)  # [C, P*n, 2*S*R]
        sums = sums.round_().clamp_(0, saturation).sum(0)  # the ADC per crossbar, then the digital adder
        sums = sums.view(planes.shape[0], n, 2 * slices, out_rows)
        out[start : start + n] = torch.einsum("pnjr,p,j->nr", sums, plane_weight, cell_weight)
    return out


def conductance_sigma(conductance: torch.Tensor | float, p: dict[str, float]) -> torch.Tensor | float:
    """H3PIMAP Eq. 1 as PytorX implements it (dimensionally consistent form): the thermal + shot noise std (S)
    of a cell at ``conductance`` (S), sqrt(G f (4 k T + 2 q V)) / V. The one place this physics lives."""
    variance = conductance * p["freq_hz"] * (4 * BOLTZMANN * p["temperature_k"] + 2 * ELECTRON_CHARGE * p["voltage_v"])
    root = torch.sqrt(variance) if isinstance(variance, torch.Tensor) else math.sqrt(variance)
    return root / p["voltage_v"]


def standard_normal(t: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise shaped like ``t`` from torch's RNG, drawn in ``t``'s logical (row-major) order whatever its
    memory layout: a transposed operand (a weight read as W^T, attention's k^T) would otherwise take torch's
    element-by-element path, 8x slower, and the repeat-vectorized forward draws the same numbers per repeat
    (hetcomp.lower.tier_repeats)."""
    return torch.randn_like(t, memory_format=torch.contiguous_format)


def read_sigma(cells: torch.Tensor, levels: int, p: dict[str, float]) -> torch.Tensor:
    """The Eq. 1 read-noise std of every cell in digit units (the ADC's): sigma(G) / (G_max - G_min) x levels at
    the cell's conductance G = G_min + digit / levels x (G_max - G_min). Deterministic: a read adds
    ``read_sigma x N(0, 1)`` to the digits (``_conductance_noise``)."""
    g_min, g_max = p["g_min_s"], p["g_max_s"]
    conductance = g_min + cells / levels * (g_max - g_min)
    return conductance_sigma(conductance, p) / (g_max - g_min) * levels


def _conductance_noise(cells: torch.Tensor, levels: int, p: dict[str, float],
                       randn: Callable[[torch.Tensor], torch.Tensor] = standard_normal) -> torch.Tensor:
    """Cell digits -> + Eq. 1 noise -> digits (same units as the ADC sees): the conductance noise scaled to digits,
    ``digit + read_sigma x N(0, 1)``. ``randn(t)``: standard normal noise for ``t`` (``standard_normal``)."""
    return cells + read_sigma(cells, levels, p) * randn(cells)


def _relative_noise(x: torch.Tensor, sigma: float,
                    randn: Callable[[torch.Tensor], torch.Tensor] = standard_normal) -> torch.Tensor:
    """``x + N(0, (sigma |x|)^2)``; ``randn`` as in ``_conductance_noise``."""
    if not sigma:
        return x
    noise = randn(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return x + sigma * x.abs() * noise
    return noise.mul_(sigma * x.abs()).add_(x)  # the same products and sum (they commute), without temporaries


class PhotonicCore(_LearnedSteps):
    """y = x W^T (+ b), or a @ b for a dynamic product, on a noisy low-precision photonic core."""

    OPERANDS = {"input": "input_bits", "weight": "weight_bits", "other": "weight_bits"}

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, settings: dict[str, Any]) -> None:
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.settings = dict(settings)
        # A dynamic product's second operand is an activation ("other"): it gets an input step of its own.
        self._init_steps(self.weight, ("input", "weight" if weight is not None else "other"))

    def _operand(self, name: str, x: torch.Tensor, randn: Callable[[torch.Tensor], torch.Tensor] = standard_normal,
                 per_repeat: bool = False, noise: bool = True) -> torch.Tensor:
        """Operand ``name`` as the core reads it: quantized, perturbed, rescaled. ``per_repeat``/``randn``: the
        repeat-vectorized forward's (``quantize``, ``_conductance_noise``); ``noise=False`` leaves it unperturbed."""
        q, scale = self._quantize(name, x, per_repeat)
        return _relative_noise(q, self.settings["input_noise_rel"] if noise else 0.0, randn) * scale

    @property
    def other_operand(self) -> str:
        """The second operand's name: the stored weight, or a dynamic product's second activation."""
        return "weight" if self.weight is not None else "other"

    def product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if _IDEAL[0]:
            return torch.matmul(a, b)
        if self.training and not self.learned:
            self._start_training({"input": a, self.other_operand: b})
        y = torch.matmul(self._operand("input", a), self._operand(self.other_operand, b))
        return _OutputQuantize.apply(y, self.settings["output_bits"])

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight is None:  # dynamic: both operands are activations
            return self.product(x, other)
        weight = self.float_weight() if _IDEAL[0] else self.weight
        y = self.product(x, weight.t())
        return y if self.bias is None else y + self.bias


class UnfoldConv(nn.Module):
    """A Conv1d/Conv2d of any ``groups`` as pad + patches (``conv_patches``) + one simulated linear core per group.

    Patch columns are ordered channel-major, so group g's columns are one contiguous block: one patch copy
    serves every group (as aihwkit_sim.GroupedAnalogConv), and each group is its own array with its own
    quantization scales. Padding is applied explicitly with ``F.pad`` so that 'same'/'valid' and every
    ``padding_mode`` behave as in torch.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, make_core: Callable[[torch.Tensor, torch.Tensor | None],
                                                                         nn.Module]) -> None:
        super().__init__()
        rows = conv.out_channels // conv.groups
        weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        self.cores = nn.ModuleList(
            make_core(weight[g * rows : (g + 1) * rows].reshape(rows, -1),
                      None if bias is None else bias[g * rows : (g + 1) * rows]) for g in range(conv.groups))
        self.weight_shape = tuple(conv.weight.shape)
        self.one_d = isinstance(conv, nn.Conv1d)
        self.kernel_size = (1, *conv.kernel_size) if self.one_d else tuple(conv.kernel_size)
        self.stride = (1, *conv.stride) if self.one_d else tuple(conv.stride)
        self.dilation = (1, *conv.dilation) if self.one_d else tuple(conv.dilation)
        self.pad = _pad_amounts(conv)
        self.pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches, out_h = self.patches(x)
        width = patches.shape[-1] // len(self.cores)
        y = torch.cat([core(patches[..., g * width : (g + 1) * width]) for g, core in enumerate(self.cores)], -1)
        return self.assemble(y, out_h)

    def patches(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(patches [N, L, C*k] of the padded input, output height); group g's columns are block g of C*k."""
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.pad_mode)
        if self.one_d:
            x = x.unsqueeze(-2)
        patches = conv_patches(x, self.kernel_size, self.stride, (0, 0), self.dilation)  # [N, H', W', C*k]
        return patches.flatten(1, 2), patches.shape[1]

    def assemble(self, y: torch.Tensor, out_h: int) -> torch.Tensor:
        """The cores' outputs [N, L, out] as the convolution's [N, out, H', W'] (Conv1d: [N, out, L])."""
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[-1], out_h, -1)
        return y.squeeze(-2) if self.one_d else y


def _pad_amounts(conv: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """The conv's padding as ``F.pad`` amounts (last dim first); 'same' pads the extra element on the right, as
    torch does."""
    amounts: list[int] = []
    for index in reversed(range(len(conv.kernel_size))):
        if conv.padding == "valid":
            left = right = 0
        elif conv.padding == "same":
            total = conv.dilation[index] * (conv.kernel_size[index] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = conv.padding[index]
        amounts += [left, right]
    return tuple(amounts)


PIM_KEYS = ("input_bits", "weight_bits", "cell_bits", "dac_bits", "adc_bits", "xbar_rows")
PHOTONIC_KEYS = ("input_bits", "weight_bits", "output_bits", "input_noise_rel")


def _wrap(module: nn.Module | None, make_core: Callable[[torch.Tensor | None, torch.Tensor | None], nn.Module]
          ) -> nn.Module:
    if module is None:
        return make_core(None, None)
    if isinstance(module, nn.Linear):
        return make_core(module.weight, module.bias)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return UnfoldConv(module, make_core)
    raise ConfigError(f"the tier simulators lower nn.Linear, nn.Conv1d and nn.Conv2d, not {type(module).__name__}; "
                      "assign this layer to digital or pcm")


class _TorchTierSimulator(Simulator):
    """Shared by the torch tier simulators: read back a (grouped) layer's weights (clipped at the learned LSQ
    range: ``float_weight``); nothing to program (their noise is drawn on every forward: read noise). Trainable:
    LSQ passes gradients to the weights, biases and step sizes (plain SGD, ``Simulator.optimizer``)."""

    trainable = True
    defaults: dict[str, Any] = {"step_init": "max-abs"}

    def settings(self, target: Target) -> dict[str, Any]:
        settings = super().settings(target)
        if settings["step_init"] not in STEP_INITS:
            raise ConfigError(f"target {target.name!r}: step_init must be one of {list(STEP_INITS)} (the LSQ step "
                              f"sizes' initial value), got {settings['step_init']!r}")
        return settings

    def digital_weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(module, UnfoldConv):  # the whole (grouped) conv weight, from its per-group cores
            weight = torch.cat([core.float_weight() for core in module.cores]).reshape(module.weight_shape)
            bias = None if module.cores[0].bias is None else torch.cat([core.bias for core in module.cores])
            return weight, bias
        return module.float_weight(), module.bias

    def repeats_unsupported(self, module: nn.Module) -> str | None:
        from hetcomp.lower.tier_repeats import tier_unsupported

        return tier_unsupported(module)

    def repeated(self, module: nn.Module, t_inference: float, program_seeds: list[int],
                 noise_seeds: list[int], programmed: list[torch.Tensor] | None = None) -> Any:
        """R independent reads at once (hetcomp.lower.tier_repeats): nothing is programmed (``program_seeds``,
        ``t_inference`` and ``programmed`` are unused); repeat r draws its read noise from ``noise_seeds[r]``."""
        from hetcomp.lower.tier_repeats import NoiseDraws, RepeatedTierLayer

        return RepeatedTierLayer(module, NoiseDraws(noise_seeds))


class PimCrossbarSimulator(_TorchTierSimulator):
    """ISAAC-style bit-serial, bit-sliced crossbar (SRAM, ReRAM); with ``conductance_noise`` (the Eq. 1
    parameters g_min_s, g_max_s, voltage_v, freq_hz, temperature_k) every read adds thermal and shot noise."""

    name = "pim-crossbar"
    required = PIM_KEYS
    defaults = {"conductance_noise": None, "step_init": "max-abs"}
    NOISE_KEYS = ("g_min_s", "g_max_s", "voltage_v", "freq_hz", "temperature_k")

    def settings(self, target: Target) -> dict[str, Any]:
        settings = super().settings(target)
        for key in PIM_KEYS:
            value = settings[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"target {target.name!r}: device parameter {key} must be an integer >= 1, got "
                                  f"{value!r}")
        noise = settings["conductance_noise"]
        if noise is not None:
            missing = [key for key in self.NOISE_KEYS if not isinstance((noise or {}).get(key), int | float)]
            if not isinstance(noise, dict) or missing:
                needed = missing or list(self.NOISE_KEYS)
                raise ConfigError(f"target {target.name!r}: conductance_noise needs numbers for {needed} (H3PIMAP "
                                  "Eq. 1's parameters)")
            if not 0 <= noise["g_min_s"] < noise["g_max_s"] or noise["voltage_v"] <= 0:
                raise ConfigError(f"target {target.name!r}: conductance_noise needs 0 <= g_min_s < g_max_s and "
                                  "voltage_v > 0")
        return settings

    def lower(self, module: nn.Module | None, target: Target) -> nn.Module:
        if module is None:
            raise ConfigError(f"target {target.name!r} (a PIM crossbar) stores weights; it cannot run a dynamic "
                              "product of two activations")
        settings = self.settings(target)
        return _wrap(module, lambda w, b: PimCrossbarCore(w, b, settings))

    def weight_noise_rel(self, target: Target) -> float:
        """Eq. 1 at full scale as a weight-noise std relative to max|W|: a weight is the shift-add of its cells,
        digit k weighted (2^cell_bits)^k, every cell at G_max."""
        settings = self.settings(target)
        noise = settings["conductance_noise"]
        if not noise:
            return 0.0
        cell_rel = conductance_sigma(noise["g_max_s"], noise) / (noise["g_max_s"] - noise["g_min_s"])
        levels = 2 ** settings["cell_bits"] - 1
        slices = math.ceil((settings["weight_bits"] - 1) / settings["cell_bits"])
        spread = math.sqrt(sum(float(2 ** settings["cell_bits"]) ** (2 * k) for k in range(slices)))
        return cell_rel * levels * spread / (2 ** (settings["weight_bits"] - 1) - 1)


class PhotonicSimulator(_TorchTierSimulator):
    """TeMPO-style photonic core: both operands quantized and perturbed by relative Gaussian noise
    (``input_noise_rel``), the product quantized to ``output_bits``; runs dynamic products too."""

    name = "photonic"
    required = PHOTONIC_KEYS

    def lower(self, module: nn.Module | None, target: Target) -> nn.Module:
        settings = self.settings(target)
        return _wrap(module, lambda w, b: PhotonicCore(w, b, settings))

    def weight_noise_rel(self, target: Target) -> float:
        return float(self.settings(target)["input_noise_rel"])
