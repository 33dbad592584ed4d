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
from hetcomp.lower.simulator import Simulator
from hetcomp.targets.base import Target

_IDEAL = [False]
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


def quantize(x: torch.Tensor, bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor quantization: (integer-valued tensor, scale); bits None -> (x, 1)."""
    if bits is None:
        return x, torch.ones((), device=x.device, dtype=x.dtype)
    levels = 2 ** (bits - 1) - 1
    scale = x.detach().abs().max().clamp_min(1e-12) / levels
    return torch.round(x / scale).clamp(-levels, levels), scale


def _bit_planes(magnitude: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """[slices, ...] digits of ``width`` bits of an integer-valued magnitude, least significant first."""
    slices = math.ceil(bits / width)
    base = 2**width
    value = magnitude.to(torch.int64)
    return torch.stack([((value >> (width * s)) % base).to(magnitude.dtype) for s in range(slices)])


class PimCrossbarCore(nn.Module):
    """y = x W^T (+ b) through bit-serial, bit-sliced crossbars with per-column ADC quantization."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, settings: dict[str, Any]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.settings = dict(settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The crossbar result, computed exactly but not bit by bit where that cannot change it.

        A crossbar column's ADC read of one input bit-plane is the identity when its sum can neither saturate nor
        be moved by noise: its cells sum to at most ``saturation`` for any input plane (``(2^dac - 1) x the sum of
        the column's cells``) and the noise summed over its rows is under half a level. Such (array, slice, chunk,
        column) blocks add ``xq @ (their cells)`` exactly, so they are folded into one effective integer weight and
        computed by one matmul of the layer's own size; only output columns with a block that could clip or round
        go through the bit-serial path (``_bit_serial``), with their other blocks zeroed. The noise is drawn
        exactly as before (same shapes, same order), so a seeded forward gives what the all-bit-serial one did.
        """
        if _IDEAL[0]:
            return F.linear(x, self.weight, self.bias)
        s = self.settings
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, x_scale = quantize(x2, s["input_bits"])
        w_scale, digits = self._cells()
        cell_bits, rows = s["cell_bits"], s["xbar_rows"]
        levels = 2**cell_bits - 1
        noise = s.get("conductance_noise")
        cells = _conductance_noise(digits, levels, noise) if noise else digits
        k = shape[-1]
        chunks = math.ceil(k / rows)
        pad = chunks * rows - k
        slices = digits.shape[1]
        out_rows = self.weight.shape[0]
        saturation = float(2 ** s["adc_bits"] - 1)
        top = float(2 ** s["dac_bits"] - 1)  # the largest input plane value
        blocked = F.pad(digits, (0, pad)).view(2, slices, out_rows, chunks, rows)
        safe = top * blocked.sum(-1) <= saturation  # [2, S, R, C]: no input can saturate the column sum
        if noise:
            spread = F.pad((cells - digits).abs(), (0, pad)).view(2, slices, out_rows, chunks, rows).sum(-1)
            safe &= top * spread < 0.5  # the noise can never move the sum to another ADC level
        significance = (torch.tensor([1.0, -1.0], dtype=x.dtype).view(2, 1)
                        * 2.0 ** (cell_bits * torch.arange(slices, dtype=x.dtype))).to(x.device)  # [2, S]
        effective = (blocked * (safe.to(x.dtype) * significance[:, :, None, None])[..., None]).sum((0, 1))
        out = xq @ effective.reshape(out_rows, -1)[:, :k].t()
        unsafe = (~safe).any(dim=3).any(dim=1).any(dim=0).nonzero().flatten()  # output columns that need the ADC
        if len(unsafe):
            masked = F.pad(cells, (0, pad)).view(2, slices, out_rows, chunks, rows)[:, :, unsafe]
            masked = masked * (~safe[:, :, unsafe]).to(x.dtype)[..., None]  # a zeroed block reads 0: adds nothing
            out[:, unsafe] += _bit_serial(xq, masked.reshape(2, slices, len(unsafe), -1)[..., :k], s)
        y = out * (x_scale * w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)

    def _cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The programmed cell digits, kept until the weight changes (they are deterministic; noise is per read)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device, self.weight.dtype)
        if getattr(self, "_cell_cache", (None,))[0] != key:
            self._cell_cache = (key, *_weight_cells(self.weight.detach(), self.settings))
        return self._cell_cache[1], self._cell_cache[2]


def _weight_cells(weight: torch.Tensor, s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight scale, cell digits [2 arrays, slices, R, K]) of a weight quantized to ``weight_bits``."""
    wq, w_scale = quantize(weight, s["weight_bits"])
    magnitude_bits, cell_bits = s["weight_bits"] - 1, s["cell_bits"]
    return w_scale, torch.stack([_bit_planes(wq.clamp(min=0), magnitude_bits, cell_bits),
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


def _conductance_noise(cells: torch.Tensor, levels: int, p: dict[str, float]) -> torch.Tensor:
    """Cell digits -> conductances -> + Eq. 1 noise -> digits (same units as the ADC sees)."""
    g_min, g_max = p["g_min_s"], p["g_max_s"]
    conductance = g_min + cells / levels * (g_max - g_min)
    noisy = conductance + conductance_sigma(conductance, p) * torch.randn_like(conductance)
    return (noisy - g_min) / (g_max - g_min) * levels


def _relative_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x + sigma * x.abs() * torch.randn_like(x) if sigma else x


class PhotonicCore(nn.Module):
    """y = x W^T (+ b), or a @ b for a dynamic product, on a noisy low-precision photonic core."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, settings: dict[str, Any]) -> None:
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.settings = dict(settings)

    def _operand(self, x: torch.Tensor, bits: int | None) -> torch.Tensor:
        q, scale = quantize(x, bits)
        return _relative_noise(q, self.settings["input_noise_rel"]) * scale

    def product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if _IDEAL[0]:
            return torch.matmul(a, b)
        s = self.settings
        y = torch.matmul(self._operand(a, s["input_bits"]), self._operand(b, s["weight_bits"]))
        q, scale = quantize(y, s["output_bits"])
        return q * scale

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight is None:  # dynamic: both operands are activations
            return self.product(x, other)
        y = self.product(x, self.weight.t())
        return y if self.bias is None else y + self.bias


class UnfoldConv(nn.Module):
    """A Conv1d/Conv2d of any ``groups`` as pad + unfold + one simulated linear core per group.

    ``unfold`` orders patch columns channel-major, so group g's columns are one contiguous block: one unfold
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
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.pad_mode)
        if self.one_d:
            x = x.unsqueeze(-2)
        patches = F.unfold(x, self.kernel_size, self.dilation, 0, self.stride).transpose(1, 2)  # [N, L, C*k]
        width = patches.shape[-1] // len(self.cores)
        y = torch.cat([core(patches[..., g * width : (g + 1) * width]) for g, core in enumerate(self.cores)], -1)
        out_h = (x.shape[-2] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        y = y.transpose(1, 2).reshape(x.shape[0], y.shape[-1], out_h, -1)
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
    """Shared by the torch tier simulators: read back a (grouped) layer's weights; nothing to program (their
    noise is drawn on every forward: read noise)."""

    def digital_weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(module, UnfoldConv):  # the whole (grouped) conv weight, from its per-group cores
            weight = torch.cat([core.weight for core in module.cores]).reshape(module.weight_shape)
            bias = None if module.cores[0].bias is None else torch.cat([core.bias for core in module.cores])
            return weight, bias
        return module.weight, module.bias


class PimCrossbarSimulator(_TorchTierSimulator):
    """ISAAC-style bit-serial, bit-sliced crossbar (SRAM, ReRAM); with ``conductance_noise`` (the Eq. 1
    parameters g_min_s, g_max_s, voltage_v, freq_hz, temperature_k) every read adds thermal and shot noise."""

    name = "pim-crossbar"
    required = PIM_KEYS
    defaults = {"conductance_noise": None}
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
