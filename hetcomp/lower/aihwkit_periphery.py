"""aihwkit's periphery arithmetic that hetcomp's two re-implementations of the torch tile's forward share: the
repeat-vectorized evaluator (hetcomp.lower.aihwkit_repeats) and the batched training forward
(hetcomp.lower.aihwkit_train), and what of the tile both reproduce (``unsupported_tile``). Each function names the
aihwkit code it follows."""

from __future__ import annotations

from typing import Any

import torch


def quantization_step(resolution: float, bound: float) -> float:
    """aihwkit's quantization step (UniformQuantize: ``res`` states or a step, scaled by the range 2 x bound);
    0: no quantization."""
    if resolution <= 0:
        return 0.0
    resolution = 1 / resolution if resolution > 1.0 else resolution
    return resolution * 2 * bound


def max_reduction(io: Any) -> float:
    """The largest input reduction of aihwkit's iterative bound management (``AnalogMVM.matmul``): a call is not run
    again once its reduction exceeds ``max_bm_factor`` or, with input quantization, ``max_bm_res / inp_res``."""
    inp_res = io.inp_res
    if inp_res > 0:
        inp_res = 1 / inp_res if inp_res > 1.0 else inp_res
        inp_res *= 2.0 * io.inp_bound
        return min(float(io.max_bm_factor), io.max_bm_res / inp_res)
    return float(io.max_bm_factor)


def input_clip_needed(io: Any, scaled_by_abs_max: bool) -> bool:
    """Whether aihwkit's input bound can act. Abs-max noise management (no threshold) maps every row into [-1, 1],
    so the bound only acts when it is tighter than the top DAC level the row maximum rounds to
    (``round(1 / step)``: 127 levels of 1/254 fit a bound of 1, 128 levels of 1/255 do not)."""
    from aihwkit.simulator.parameters.enums import NoiseManagementType

    if io.inp_bound <= 0:
        return False
    if not (scaled_by_abs_max and io.noise_management == NoiseManagementType.ABS_MAX and io.nm_thres <= 0.0):
        return True
    step = quantization_step(io.inp_res, io.inp_bound)
    if not step:
        return io.inp_bound < 1.0
    return round(1.0 / step) > io.inp_bound / step + 1e-6  # in DAC levels


def row_maximum_level_is_whole(io: Any) -> bool:
    """Whether abs-max scaling puts a row's maximum on a whole DAC level (1 / step an integer: 254 levels of 8-bit,
    not 255). Then scaling an input straight to levels, ``x * (1 / (nm * step))``, rounds as aihwkit's
    ``(x / nm) / step`` does; otherwise the maximum lands on a rounding boundary and only aihwkit's order of
    operations rounds it as aihwkit does."""
    step = quantization_step(io.inp_res, io.inp_bound)
    return bool(step) and abs(1.0 / step - round(1.0 / step)) < 1e-6


def per_output(values: torch.Tensor, out_size: int) -> torch.Tensor:
    """A tile's per-output-column scale vector (aihwkit keeps a scalar scale as one value)."""
    if values.dim() == 1 and values.shape[0] == out_size:
        return values
    values = values.reshape(-1)
    return values.expand(out_size) if values.numel() == 1 else values


def unsupported_tile(tile: Any) -> str | None:
    """Why a tile's forward is not the torch tile's one-pass MVM that both re-implementations reproduce (None: it is):
    the tile class, multi-pass or stochastically rounded MVMs, per-output noise std, a learned input range, noise
    management beyond none / abs-max / constant / signed max, analog bias and transposed tiles. Each caller adds the
    checks of what it alone reproduces (the evaluator's noise model and drift, the trainer's weight noise)."""
    from aihwkit.simulator.parameters.enums import AnalogMVType, NoiseManagementType
    from aihwkit.simulator.tiles.inference_torch import TorchInferenceTile
    from aihwkit.simulator.tiles.torch_tile import TorchSimulatorTile

    inner = getattr(tile, "tile", None)
    if type(tile) is not TorchInferenceTile or type(inner) is not TorchSimulatorTile:
        return f"tile class {type(tile).__name__}/{type(inner).__name__} (the torch tile only)"
    io = tile.rpu_config.forward
    if io.mv_type != AnalogMVType.ONE_PASS or io.out_noise_std > 0 or io.inp_sto_round or io.out_sto_round:
        return "forward settings beyond the torch tile's one-pass MVM with one output noise and rounding to nearest"
    if io.noise_management not in (NoiseManagementType.NONE, NoiseManagementType.ABS_MAX,
                                   NoiseManagementType.CONSTANT, NoiseManagementType.MAX):
        return f"noise management {io.noise_management}"
    if tile.analog_bias or tile.in_trans or tile.out_trans or tile.input_range is not None:
        return "analog bias, transposed tiles or a learned input range"
    return None
