"""The train-mode forward of a lowered PCM layer: all of its aihwkit torch tiles in one batched call.

aihwkit runs a layer that spans several tiles (a ``TileModuleArray``, a grouped convolution's groups) one tile call
at a time, and each torch-tile call is about 40 small operations with 3-4 host synchronizations (the all-zero-input
shortcut, the ``nm <= 0`` masked write, the bound-management test). On a GPU that launching, not arithmetic, bounded
ResNet-20's LAFT step (bench/laft_steps.py), so a second GPU could not shorten it. In train mode hetcomp's lowered
layers run ``train_forward`` instead: the torch tile's training forward (``TorchInferenceTile.forward`` ->
``TorchSimulatorTile.forward`` -> ``AnalogMVM.matmul``) kept step for step, over all the layer's tiles ("sites") at
once:

- training weight noise (``rpu_config.modifier``: ADD_NORMAL relative to each tile's own max|W|, or MULT_NORMAL),
  drawn for all tiles in one call, without gradient, as aihwkit;
- noise management per input row and tile, differentiated through as aihwkit does (its abs-max is in the graph);
- input quantization with aihwkit's own straight-through ``UniformQuantize``, the input bound (no gradient beyond it),
  input noise and asymmetry;
- one batched matmul; output asymmetry, noise, quantization (straight-through) and bound;
- iterative bound management *per tile*, as aihwkit tests it per tile call: a tile whose output clips anywhere is
  run again with its input scaled down by 2 (the same noisy weights, fresh output noise) until it passes or
  aihwkit's limits (``max_bm_factor``, ``max_bm_res``) are reached; one host synchronization per layer and round
  instead of several per tile;
- a tile whose input is all zero gives zeros, without gradient (aihwkit's shortcut);
- mapping scales, learned output scales (with their gradient), tile sums and the digital bias.

The weights stay the tiles' own Parameters (stacked inside the graph), so AnalogSGD, aihwkit's weight-gradient
hooks (``set_scales``) and its post-update clip and remap act on them unchanged. The one difference from aihwkit
is the order of the random draws: with the training and forward noise off, outputs and gradients equal aihwkit's
to float rounding; with them on, every draw has aihwkit's distribution (tests/test_aihwkit_train.py). Eval mode stays
aihwkit's tile forward, the reference the repeat-vectorized evaluator (hetcomp.lower.aihwkit_repeats) is tested
against. A layer whose tiles use a setting this forward does not reproduce (``unsupported`` says which) runs
aihwkit's own forward in train mode too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetcomp.errors import ConfigError
from hetcomp.lower.aihwkit_periphery import (
    input_clip_needed,
    max_reduction,
    per_output,
    quantization_step,
    row_maximum_level_is_whole,
    unsupported_tile,
)
from hetcomp.lower.aihwkit_repeats import Layout, SiteGeometry, block_plan, layout


@dataclass
class _TrainPlan:
    """What a layer's train-mode forward reads that does not change between calls: its tile layout, whether its
    tiles are supported (checked against the rpu_config objects it read), and its site geometry per device."""

    lay: Layout
    configs: list[Any]
    reason: str | None
    geometries: dict[torch.device, SiteGeometry] = field(default_factory=dict)

    def current(self) -> bool:
        """Whether every tile still has the rpu_config it was checked with (aihwkit's load_state_dict replaces it)."""
        return all(site.tile.rpu_config is config for site, config in zip(self.lay.sites, self.configs))

    def geometry(self, device: torch.device) -> SiteGeometry:
        if device not in self.geometries:
            self.geometries[device] = SiteGeometry(self.lay, device)
        return self.geometries[device]


def _plan(layer: nn.Module) -> _TrainPlan:
    """The layer's plan, built on the first call and again when a tile's rpu_config was replaced."""
    plan = layer.__dict__.get("_train_plan")
    if plan is None or not plan.current():
        lay = layout(layer)
        plan = layer.__dict__["_train_plan"] = _TrainPlan(lay, [site.tile.rpu_config for site in lay.sites],
                                                           unsupported(layer))
    return plan


def batched_training(layer: nn.Module) -> bool:
    """Whether ``layer`` runs ``train_forward``: in train mode, with tiles it supports (``unsupported``)."""
    return layer.training and _plan(layer).reason is None


def unsupported(layer: nn.Module) -> str | None:
    """Why ``layer``'s tiles cannot train through ``train_forward`` (None: they can): what neither re-implementation
    reproduces (``aihwkit_periphery.unsupported_tile``), tiles of one layer set up differently, and the training
    forward's own limits (bound management, signed max over unequal tiles, the weight-noise modifier)."""
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType, WeightModifierType

    try:
        lay = layout(layer)
    except ConfigError as error:
        return str(error)
    first_tile = lay.sites[0].tile
    first = first_tile.rpu_config
    for site in lay.sites:
        tile = site.tile
        reason = unsupported_tile(tile)
        if reason is not None:
            return reason
        config = tile.rpu_config
        if config.forward != first.forward or config.modifier != first.modifier:
            return "tiles with different forward or modifier settings"
        if (tile.get_mapping_scales() is None) != (first_tile.get_mapping_scales() is None) or \
                (tile.out_scaling_alpha is None) != (first_tile.out_scaling_alpha is None):
            return "tiles with and without mapping or learned output scales"
    io, modifier = first.forward, first.modifier
    if io.bound_management not in (BoundManagementType.NONE, BoundManagementType.ITERATIVE):
        return f"bound management {io.bound_management}"
    if io.noise_management == NoiseManagementType.MAX and block_plan(lay) is None:
        return "signed-max noise management on tiles of unequal sizes (the zero padding would change the max)"
    if modifier.type not in (WeightModifierType.NONE, WeightModifierType.COPY, WeightModifierType.ADD_NORMAL,
                             WeightModifierType.MULT_NORMAL) or modifier.per_batch_sample:
        return f"training weight noise {modifier.type} (per_batch_sample={modifier.per_batch_sample})"
    return None


def train_forward(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The layer's train-mode output for input rows [..., in_features] -> [..., out_features] (module docstring)."""
    plan = _plan(layer)
    lay = plan.lay
    geometry = plan.geometry(rows.device)
    tiles = [site.tile for site in lay.sites]
    config = tiles[0].rpu_config
    weights = _stacked(geometry, [tile.tile.weight for tile in tiles])  # [S, out_max, in_max]
    weights = _with_training_noise(weights, config.modifier, geometry)
    flat = rows.reshape(-1, rows.shape[-1])
    y = _analog_mvm(geometry.site_rows(flat), weights, config.forward, geometry)  # [S, M, out_max]
    mapping = [tile.get_mapping_scales() for tile in tiles]
    learned = [tile.out_scaling_alpha for tile in tiles]
    scales = None  # mapping scales times learned output scales (aihwkit applies one after the other)
    if mapping[0] is not None:
        scales = _stacked(geometry, [per_output(m, tile.out_size) for m, tile in zip(mapping, tiles)])
    if learned[0] is not None:
        alpha = _stacked(geometry, [per_output(a, tile.out_size) for a, tile in zip(learned, tiles)])
        scales = alpha if scales is None else scales * alpha
    if scales is not None:
        y = y * scales[:, None]
    out = geometry.combine(y[None], lay.out_features)[0]
    if lay.bias is not None:
        out = out + lay.bias
    return out.reshape(*rows.shape[:-1], lay.out_features)


def _stacked(geometry: SiteGeometry, values: list[torch.Tensor]) -> torch.Tensor:
    """Per-site tensors (weights [out, in] or vectors [out]) stacked and zero-padded to the largest site, in the graph
    (their gradients reach each tile's own Parameter)."""
    if geometry.plan is None:
        def pad(value: torch.Tensor) -> torch.Tensor:
            widths = (0, geometry.in_max - value.shape[-1], 0, geometry.out_max - value.shape[0])
            return F.pad(value, widths if value.dim() == 2 else (0, geometry.out_max - value.shape[0]))

        values = [pad(value) for value in values]
    return torch.stack(values)


def _with_training_noise(weights: torch.Tensor, modifier: Any, geometry: SiteGeometry) -> torch.Tensor:
    """aihwkit's ``TorchSimulatorTile.modify_weight`` per tile: ADD_NORMAL (std x each tile's max|W| when
    ``rel_to_actual_wmax``, else x ``assumed_wmax``) or MULT_NORMAL noise, drawn without gradient."""
    from aihwkit.simulator.parameters.enums import WeightModifierType

    if modifier.type in (WeightModifierType.NONE, WeightModifierType.COPY):
        return weights
    with torch.no_grad():
        gauss = torch.randn_like(weights)
        if modifier.type == WeightModifierType.MULT_NORMAL:
            noise = gauss.mul_(weights).mul_(modifier.std_dev)
        elif modifier.rel_to_actual_wmax:
            noise = gauss.mul_(weights.abs().amax(dim=(-2, -1), keepdim=True).mul_(modifier.std_dev))
        else:
            noise = gauss.mul_(modifier.std_dev * modifier.assumed_wmax)
        if geometry.plan is None:  # padding stays zero
            noise = noise.mul_(geometry.valid_out[:, :, None] & geometry.valid_in[:, None, :])
    return weights + noise


class _RoundSTE(torch.autograd.Function):
    """round() with the straight-through gradient of aihwkit's ``UniformQuantize``."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _analog_mvm(x: torch.Tensor, weights: torch.Tensor, io: Any, geometry: SiteGeometry) -> torch.Tensor:
    """``AnalogMVM.matmul`` per site: x [S, M, in], weights [S, out, in] -> [S, M, out].

    As in the repeat-vectorized evaluator, input and output are kept in DAC/ADC level units (the input scaled straight
    to levels and rounded, the matmul against weights times the DAC step, the output rounded to ADC levels and
    clipped) and one multiply per row scales back: aihwkit's arithmetic with fewer passes over the data."""
    from aihwkit.simulator.parameters.enums import BoundManagementType
    from aihwkit.simulator.tiles.analog_mvm import AnalogMVM

    if io.is_perfect:
        return torch.bmm(x, weights.transpose(1, 2))
    nm = AnalogMVM._compute_noise_management(x, io.noise_management, io)  # [S, M, 1] or a number
    zero = None
    if isinstance(nm, torch.Tensor):
        if io.inp_noise <= 0.0:
            zero = (nm == 0.0).flatten(1).all(dim=1)  # [S]: aihwkit returns zeros for an all-zero tile call
        nm = torch.where(nm <= 0.0, 1.0, nm)
    # The input is scaled by 1 / nm (aihwkit's ``scale``), the output back by nm.
    valid_out = None if geometry.plan is not None else geometry.valid_out
    passed, out, unit = _computed(x, weights, nm, io, valid_out, rerun=False)
    out = out * (nm * (unit * io.out_scale))
    if io.bound_management != BoundManagementType.NONE:
        out = _bound_managed(x, weights, nm, io, valid_out, out, passed if zero is None else passed | zero)
    if zero is not None:
        out = out.masked_fill(zero[:, None, None], 0.0)
    return out


def _bound_managed(x: torch.Tensor, weights: torch.Tensor, nm: Any, io: Any, valid_out: torch.Tensor | None,
                   out: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """aihwkit's iterative bound management per site: sites whose output clipped are run again at half the input
    scale until they pass or the reduction passes ``max_bm_factor`` or ``max_bm_res / inp_res``."""
    limit = max_reduction(io)
    reduction = 1.0
    pending = ~passed
    while reduction <= limit:
        index = pending.nonzero().squeeze(1)  # the one host synchronization per round
        if index.numel() == 0:
            break
        reduction *= 2.0
        sub_nm = (nm[index] if isinstance(nm, torch.Tensor) else nm) * reduction
        ok, result, unit = _computed(x[index], weights[index], sub_nm, io,
                                     None if valid_out is None else valid_out[index], rerun=True)
        out = out.index_put((index,), result * (sub_nm * (unit * io.out_scale)))
        pending = torch.zeros_like(pending).index_put((index,), ~ok)
    return out


def _computed(x: torch.Tensor, weights: torch.Tensor, nm: Any, io: Any, valid_out: torch.Tensor | None,
              rerun: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """aihwkit's ``_compute_analog_mv`` per site (prepare input, matmul, finalize output) for an input scaled by
    ``1 / nm``: (bound test passed [S], output [S, M, out] in units of ``unit``, unit). ``valid_out``: the real
    outputs of padded sites (None: no padding)."""
    from aihwkit.simulator.parameters.enums import BoundManagementType

    in_step = quantization_step(io.inp_res, io.inp_bound)
    if in_step and not rerun and isinstance(nm, torch.Tensor) and row_maximum_level_is_whole(io):
        levels = _RoundSTE.apply(x * (1.0 / (nm * in_step)))  # one pass instead of two
    else:  # aihwkit's order, (x * scale) / step: a rerun's halved row maximum lands exactly on a rounding boundary
        scale = 1.0 / nm
        levels = x * scale if isinstance(scale, torch.Tensor) or scale != 1.0 else x
        if in_step:
            levels = _RoundSTE.apply(levels / in_step)
    if input_clip_needed(io, isinstance(nm, torch.Tensor)):
        bound = io.inp_bound / in_step if in_step else io.inp_bound
        levels = torch.where(levels.abs() <= bound, levels, levels.clamp(-bound, bound).detach())
    if io.inp_noise > 0.0:
        levels = levels + torch.randn_like(levels) * (io.inp_noise / (in_step or 1.0))
    if io.inp_asymmetry != 0.0:
        levels = torch.where(levels < 0, levels * (1.0 - io.inp_asymmetry), levels)
    out = torch.bmm(levels, (weights * in_step if in_step else weights).transpose(1, 2))
    if io.out_asymmetry != 0.0:
        out = torch.where(out < 0, out * (1.0 - io.out_asymmetry), out)
    if io.out_noise > 0.0:
        out = out + torch.randn_like(out) * io.out_noise
    out_step = quantization_step(io.out_res, io.out_bound)
    unit = 1.0
    if out_step:
        out = _RoundSTE.apply(out * (1.0 / out_step))
        unit = out_step
    if io.out_bound <= 0:
        return torch.ones(out.shape[0], dtype=torch.bool, device=out.device), out, unit
    if io.bound_management == BoundManagementType.NONE:  # clipped, not tested
        return torch.ones(out.shape[0], dtype=torch.bool, device=out.device), \
            out.clamp(-io.out_bound / unit, io.out_bound / unit), unit
    tested = out if valid_out is None else out.masked_fill(~valid_out[:, None, :], 0.0)  # padding takes no test
    passed = tested.abs().amax(dim=(1, 2)) * unit <= io.out_bound  # in output units, as aihwkit tests
    return passed, out.clamp(-io.out_bound / unit, io.out_bound / unit), unit
