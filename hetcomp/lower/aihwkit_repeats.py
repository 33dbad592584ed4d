"""R hardware repeats of an aihwkit (PCM) layer at once: stacked realizations and a forward that carries them.

A hardware repeat re-programs every tile (programming noise, drift exponents ν), drifts it to ``t_inference``
(drift and accumulated read noise) and compensates the drift (GlobalDriftCompensation's α from an eye read-out
before and after drift). This module draws R such realizations of a layer's tiles *with aihwkit's own noise model
objects* — the target's ``PCMLikeNoiseModel`` (or subclass) ``apply_programming_noise_to_conductance``,
``generate_drift_coefficients`` and ``apply_drift_noise_to_conductance`` — on conductances of all the layer's
tiles stacked (``draw_realizations``), or reads them from the tiles after aihwkit's own ``program_weights`` /
``drift_weights`` per repeat (``capture_realization``: the reference, identical draws to the tile path).

``RepeatedAnalogLayer`` then runs the data once for all R realizations: the layer's tiles are *sites* (a weight
block reading some input columns and writing some output columns: a ``TileModuleArray``'s grid, a grouped
convolution's groups), padded to one shape and run as one batched matmul over (repeat, site). The periphery is the
torch tile's (``AnalogMVM.matmul``), kept operation for operation: noise management (abs-max per input row and
tile), input quantization and bound, the all-zero-input shortcut, output noise, output quantization and bound,
iterative bound management — with the bound test per (repeat, tile) call, as aihwkit tests it per tile call —,
then mapping scales, drift compensation α, learned output scales and the digital bias. Inputs the R repeats share
(the first analog layer's, computed once by the digital prefix) are prepared once and multiplied by the R weight
realizations in one GEMM.

Randomness: repeat r's programming draws come from torch's RNG seeded by (seed, r, layer) (``program``, one repeat
at a time, so ranks may draw parts of a group apart), its forward noise from its own ``torch.Generator``, restarted
per data chunk (``at_chunk``); so a repeat's result does not depend on how repeats are grouped or how repeats and
chunks are split over ranks.
"""

from __future__ import annotations

import copy
import math
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
from hetcomp.lower.patches import conv_patches
from hetcomp.lower.repeats import chunk_seed, seed_draws


@dataclass
class Site:
    """One tile of a layer: it reads ``inputs`` (column indices of the layer's input rows) and writes ``outputs``."""

    tile: Any  # aihwkit TorchInferenceTile
    inputs: list[int]
    outputs: list[int]


@dataclass
class Layout:
    """A lowered layer as tile sites, with how its input rows are formed (unfold geometry) and its bias."""

    sites: list[Site]
    in_features: int
    out_features: int
    biases: list[torch.Tensor]  # the digital bias Parameters of the layer's parts (a grouped convolution: per group)
    conv: dict[str, Any] | None = None  # kernel_size, stride, padding, dilation, out_channels, one_d

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's digital bias, from its parts' current parameters (differentiable); None without one."""
        if not self.biases:
            return None
        return self.biases[0] if len(self.biases) == 1 else torch.cat(self.biases)


def _tiles_of(analog_module: nn.Module, in_offset: int, out_offset: int) -> tuple[list[Site], torch.Tensor | None]:
    """Sites of an aihwkit tile module (a ``TileModuleArray`` grid or a single tile) and its digital bias."""
    from aihwkit.simulator.tiles.array import TileModuleArray

    if isinstance(analog_module, TileModuleArray):
        sites, in_start = [], in_offset
        for in_size, row in zip(analog_module.in_sizes, analog_module.array):
            out_start = out_offset
            for out_size, tile in zip(analog_module.out_sizes, row):
                sites.append(Site(tile, list(range(in_start, in_start + in_size)),
                                  list(range(out_start, out_start + out_size))))
                out_start += out_size
            in_start += in_size
        return sites, analog_module.bias
    tile = analog_module
    bias = tile.bias if getattr(tile, "digital_bias", False) else None
    return [Site(tile, list(range(in_offset, in_offset + tile.in_size)),
                 list(range(out_offset, out_offset + tile.out_size)))], bias


def layout(layer: nn.Module) -> Layout:
    """The tile sites of a lowered aihwkit layer (AnalogLinear, AnalogConv2d, hetcomp's GroupedAnalogConv)."""
    import aihwkit.nn as analog_nn

    from hetcomp.lower.aihwkit_sim import GroupedAnalogConv

    if isinstance(layer, GroupedAnalogConv):
        sites, biases = [], []
        columns = None
        out_start = 0
        for group, part in enumerate(layer.tiles):
            columns = part.analog_module.in_size if columns is None else columns
            part_sites, bias = _tiles_of(part.analog_module, group * columns, out_start)
            sites += part_sites
            biases.append(bias)
            out_start += part.analog_module.out_size
        conv = {"kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
                "dilation": layer.dilation, "out_channels": layer.out_channels, "one_d": layer.one_d}
        return Layout(sites, columns * layer.groups, out_start, [] if biases[0] is None else biases, conv)
    if isinstance(layer, analog_nn.AnalogLinear):
        sites, bias = _tiles_of(layer.analog_module, 0, 0)
        return Layout(sites, layer.in_features, layer.out_features, [] if bias is None else [bias])
    if isinstance(layer, analog_nn.AnalogConv2d):  # a Conv1d is lowered as a GroupedAnalogConv (aihwkit_sim)
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ConfigError(f"padding_mode {layer.padding_mode!r}")
        sites, bias = _tiles_of(layer.analog_module, 0, 0)
        conv = {"kernel_size": tuple(layer.kernel_size), "stride": tuple(layer.stride), "padding": tuple(layer.padding),
                "dilation": tuple(layer.dilation), "out_channels": layer.out_channels, "one_d": False}
        return Layout(sites, layer.analog_module.in_size, layer.analog_module.out_size, [] if bias is None else [bias],
                      conv)
    raise ConfigError(f"{type(layer).__name__} is not an aihwkit layer hetcomp lowers")


def unsupported(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot run repeat-vectorized (None: it can): features of the tile the forward here does not
    reproduce fall back to the tile path (``aihwkit_periphery.unsupported_tile``, then the noise model, conductance
    converter and drift compensation the realizations are drawn with)."""
    from aihwkit.inference import GlobalDriftCompensation
    from aihwkit.inference.converter.conductance import SinglePairConductanceConverter
    from aihwkit.inference.noise.base import BaseNoiseModel

    try:
        sites = layout(layer).sites
    except ConfigError as error:
        return str(error)
    for site in sites:
        tile = site.tile
        reason = unsupported_tile(tile)
        if reason is not None:
            return reason
        config = tile.rpu_config
        model = config.noise_model
        if (type(model).apply_programming_noise is not BaseNoiseModel.apply_programming_noise
                or type(model).apply_drift_noise is not BaseNoiseModel.apply_drift_noise
                or type(model.g_converter) is not SinglePairConductanceConverter):
            return f"noise model {type(model).__name__} with its own programming/drift or conductance converter"
        compensation = config.drift_compensation
        if compensation is not None and type(compensation) is not GlobalDriftCompensation:
            return f"drift compensation {type(compensation).__name__}"
    return None


@dataclass
class Realizations:
    """R realizations of a layer's tiles, stacked: weights [R, S, out, in] (normalized conductance units, padded
    with zeros), drift compensation α [R, S] (1 without compensation)."""

    weights: torch.Tensor
    alpha: torch.Tensor
    seeds: list[int] = field(default_factory=list)  # per repeat: seeds its forward noise generator

    def select(self, indices: list[int]) -> Realizations:
        return Realizations(self.weights[indices], self.alpha[indices], [self.seeds[i] for i in indices])


class SiteGeometry:
    """Gather/scatter indices that pad every site to one [out_max, in_max] block."""

    def __init__(self, lay: Layout, device: torch.device) -> None:
        self.in_max = max(len(s.inputs) for s in lay.sites)
        self.out_max = max(len(s.outputs) for s in lay.sites)
        pad_in, pad_out = lay.in_features, lay.out_features  # index of a zero column / a discarded column
        self.gather = torch.tensor([s.inputs + [pad_in] * (self.in_max - len(s.inputs)) for s in lay.sites],
                                   device=device)
        self.scatter = torch.tensor([s.outputs + [pad_out] * (self.out_max - len(s.outputs)) for s in lay.sites],
                                    device=device).flatten()
        self.valid_out = torch.tensor([[k < len(s.outputs) for k in range(self.out_max)] for s in lay.sites],
                                      device=device)
        self.valid_in = torch.tensor([[k < len(s.inputs) for k in range(self.in_max)] for s in lay.sites],
                                     device=device)
        self.padded = any(len(s.inputs) < self.in_max or len(s.outputs) < self.out_max for s in lay.sites)
        self.plan = block_plan(lay)


    def pad_weights(self, weights: list[torch.Tensor]) -> torch.Tensor:
        out = weights[0].new_zeros((len(weights), self.out_max, self.in_max))
        for index, weight in enumerate(weights):
            out[index, : weight.shape[0], : weight.shape[1]] = weight
        return out

    def site_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Each site's input rows: [..., M, in] -> [..., S, M, in_max] (a view when the sites read consecutive equal
        blocks, else a gather with a zero column for padding)."""
        if self.plan is not None:
            kind, blocks, per_block = self.plan
            x = rows.view(*rows.shape[:-1], blocks, self.in_max).movedim(-2, -3)  # [..., I, M, in]
            if kind == "grid" and per_block > 1:
                x = x.unsqueeze(-3).expand(*x.shape[:-2], per_block, *x.shape[-2:]).flatten(-4, -3)
            return x
        padded = F.pad(rows, (0, 1))  # the zero column padded sites read
        return padded[..., self.gather].movedim(-2, -3)

    def combine(self, y: torch.Tensor, out_features: int) -> torch.Tensor:
        """Per-site outputs [R, S, M, out_max] -> the layer's [R, M, out]: tiles reading other inputs summed, tiles
        writing other outputs side by side (differentiable)."""
        repeats, sites, m, width = y.shape
        if self.plan is not None:
            kind, blocks, per_block = self.plan
            if kind == "grid":  # [R, I, J, M, out] summed over the input blocks, J output blocks side by side
                y = y.view(repeats, blocks, per_block, m, width)
                y = y[:, 0] if blocks == 1 else y.sum(1)
            return y[:, 0] if y.shape[1] == 1 else y.permute(0, 2, 1, 3).reshape(repeats, m, -1)
        out = y.new_zeros((repeats, m, out_features + 1))
        out = out.index_add(-1, self.scatter, y.permute(0, 2, 1, 3).reshape(repeats, m, sites * width))
        return out[..., :-1]


def block_plan(lay: Layout) -> tuple[str, int, int] | None:
    """How the sites tile the layer when no gather/scatter is needed: ("grid", I, J) — I equal consecutive input
    blocks times J equal output blocks, site i*J+j reads block i and writes block j (a TileModuleArray; sums over
    i) — or ("diagonal", G, 1) — site g reads input block g and writes output block g (a grouped convolution).
    None: sizes differ (gather and scatter with padding)."""
    sites = lay.sites
    count = len(sites)
    in_size, out_size = len(sites[0].inputs), len(sites[0].outputs)
    if any(len(s.inputs) != in_size or len(s.outputs) != out_size for s in sites):
        return None

    def block(start: int, size: int) -> list[int]:
        return list(range(start * size, (start + 1) * size))

    if all(s.inputs == block(k, in_size) and s.outputs == block(k, out_size) for k, s in enumerate(sites)):
        if count * in_size == lay.in_features and count * out_size == lay.out_features:
            return ("diagonal", count, 1)
    blocks_in, blocks_out = lay.in_features // in_size, lay.out_features // out_size
    if (blocks_in * blocks_out == count and blocks_in * in_size == lay.in_features
            and blocks_out * out_size == lay.out_features
            and all(s.inputs == block(k // blocks_out, in_size) and s.outputs == block(k % blocks_out, out_size)
                    for k, s in enumerate(sites))):
        return ("grid", blocks_in, blocks_out)
    return None


def _site_tensor(values: list[torch.Tensor | None], width: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """Per-site vectors (mapping or learned output scales; None or a scalar broadcast) padded to ``width``."""
    out = like.new_full((len(values), width), fill)
    for index, value in enumerate(values):
        if value is None:
            continue
        value = per_output(value.detach().to(like), width)  # a scalar spans the padded width too (sliced off later)
        out[index, : value.numel()] = value
    return out


def capture_realization(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's current programmed-and-drifted tiles (after aihwkit's program_weights/drift_weights) as
    (weights [S, out, in] padded, α [S])."""
    lay = layout(layer)
    geometry = SiteGeometry(lay, torch.device("cpu"))
    weights = geometry.pad_weights([s.tile.tile.weight.detach() for s in lay.sites])
    alpha = torch.stack([_alpha(s.tile).to(weights) for s in lay.sites])
    return weights, alpha


def _alpha(tile: Any) -> torch.Tensor:
    if tile.rpu_config.drift_compensation is None:
        return torch.ones((), device=tile.tile.weight.device)
    return torch.as_tensor(tile.alpha).detach().reshape(-1)[0]


class _Conductances:
    """aihwkit's SinglePairConductanceConverter, per tile: each [out, in] block gets its own abs-max scale (the
    converter takes one tensor's max; here a stack of tiles and repeats is converted at once)."""

    def __init__(self, converter: Any) -> None:
        from aihwkit.inference.converter.conductance import _ZERO_CLIP

        self.g_max, self.g_min, self.zero_clip = converter.g_max, converter.g_min, _ZERO_CLIP

    def to_conductances(self, weights: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        abs_max = weights.abs().amax(dim=(-2, -1), keepdim=True)
        scale_ratio = (self.g_max - self.g_min) / abs_max.clamp(min=self.zero_clip)
        scaled = weights * scale_ratio
        return [scaled.clamp(min=0.0, max=self.g_max) + self.g_min,
                (-scaled).clamp(min=0.0, max=self.g_max) + self.g_min], scale_ratio

    def to_weights(self, conductances: list[torch.Tensor], scale_ratio: torch.Tensor) -> torch.Tensor:
        return ((conductances[0] - self.g_min) - (conductances[1] - self.g_min)) / scale_ratio


def reference_weights(layer: nn.Module) -> torch.Tensor:
    """The weights aihwkit programs from (its ``reference_combined_weights``, else the tile's current weights),
    padded: [S, out, in]."""
    lay = layout(layer)
    geometry = SiteGeometry(lay, torch.device("cpu"))
    blocks = []
    for site in lay.sites:
        reference = site.tile.reference_combined_weights
        blocks.append((site.tile.tile.weight if reference is None else reference).detach())
    return geometry.pad_weights(blocks)


def program(layer: nn.Module, t_inference: float, program_seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """R programmed realizations of ``layer``'s tiles from the tiles' noise model and the same drifted to
    ``t_inference``: (programmed, drifted), each [R, S, out, in] (padded). Repeat r draws from torch's RNG seeded by
    ``program_seeds[r]`` alone (the caller's RNG is untouched), so parts of a group drawn apart (on several ranks)
    stack to the group's."""
    lay = layout(layer)
    device = lay.sites[0].tile.tile.weight.device
    geometry = SiteGeometry(lay, device)
    reference = reference_weights(layer).to(device)
    if not program_seeds:
        empty = reference.new_empty((0, *reference.shape))
        return empty, empty.clone()
    mask = (geometry.valid_out[:, :, None] & geometry.valid_in[:, None, :]).to(reference.dtype)
    model = lay.sites[0].tile.rpu_config.noise_model
    converter = _Conductances(model.g_converter)
    programmed, drifted = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for seed in program_seeds:
            seed_draws(seed, device)
            conductances, scale = converter.to_conductances(reference)
            noisy = [model.apply_programming_noise_to_conductance(g) for g in conductances]
            nu = [model.generate_drift_coefficients(g) for g in conductances]
            weights = converter.to_weights(noisy, scale) * mask
            conductances, scale = converter.to_conductances(weights)
            moved = [model.apply_drift_noise_to_conductance(g, n, t_inference) for g, n in zip(conductances, nu)]
            programmed.append(weights)
            drifted.append(converter.to_weights(moved, scale) * mask)
    return torch.stack(programmed), torch.stack(drifted)


def draw_realizations(layer: nn.Module, t_inference: float, program_seeds: list[int], noise_seeds: list[int],
                      programmed: tuple[torch.Tensor, torch.Tensor] | None = None) -> Realizations:
    """R programmed-and-drifted realizations of ``layer``'s tiles from the tiles' noise model (one per seed), with
    their drift compensation α read out from the stacks together. ``programmed``: ``program``'s (programmed,
    drifted) for these seeds, drawn already (None: drawn here)."""
    programmed_stack, drifted_stack = programmed if programmed is not None else program(layer, t_inference,
                                                                                         program_seeds)
    config = layout(layer).sites[0].tile.rpu_config
    alpha = torch.ones(programmed_stack.shape[:2], device=programmed_stack.device, dtype=programmed_stack.dtype)
    if config.drift_compensation is not None:  # aihwkit: alpha = readout(programmed) / readout(drifted), eye input
        readout_seeds = [(seed * 6364136223846793005 + 1442695040888963407) % 2**63 for seed in noise_seeds]
        forward = RepeatedAnalogLayer(layer, Realizations(programmed_stack, alpha, readout_seeds))
        baseline = forward.readout(programmed_stack)
        alpha = baseline / forward.readout(drifted_stack)
    return Realizations(drifted_stack, alpha, list(noise_seeds))


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


class RepeatedAnalogLayer:
    """A lowered aihwkit layer run for R realizations at once (see the module docstring).

    ``forward(x, folded)``: ``x`` is either shared by all repeats ([B, ...], ``folded=False``) or holds the repeats
    folded into the batch, repeat-major ([R*B, ...]); the result is always folded. ``noise=False`` turns the
    forward's input/output noise off (what the fold check compares with).
    """

    def __init__(self, layer: nn.Module, realizations: Realizations) -> None:
        self.lay = layout(layer)
        self.io = self.lay.sites[0].tile.rpu_config.forward
        self.realizations = realizations
        self.repeats = realizations.weights.shape[0]
        weights = realizations.weights
        self.geometry = SiteGeometry(self.lay, weights.device)
        tiles = [s.tile for s in self.lay.sites]
        self.mapping = _site_tensor([t.get_mapping_scales() for t in tiles], self.geometry.out_max, 1.0, weights)
        self.out_scales = _site_tensor([t.out_scaling_alpha for t in tiles], self.geometry.out_max, 1.0, weights)
        self.generators = _generators(realizations.seeds, weights.device)
        self.noise = True
        from aihwkit.simulator.parameters.enums import NoiseManagementType

        self.abs_max_scaled = (self.io.noise_management == NoiseManagementType.ABS_MAX and self.io.nm_thres <= 0.0)
        self.pooled = self._poolable()

    def _poolable(self) -> bool:
        """Whether the convolution can skip materializing patches (``_pooled_conv``): abs-max noise management, no
        input noise, and tiles that read whole input channels in order (one tile, a grouped convolution's
        groups, or an array split on channel boundaries)."""
        conv, plan, io = self.lay.conv, self.geometry.plan, self.io
        if conv is None or plan is None or not self.abs_max_scaled or io.inp_noise > 0.0 or io.is_perfect:
            return False
        kind, blocks, per_block = plan
        window = conv["kernel_size"][0] * conv["kernel_size"][1]
        return (kind == "diagonal" or per_block == 1) and self.geometry.in_max % window == 0

    def at_chunk(self, index: int) -> None:
        """Restart every repeat's forward noise for data chunk ``index`` (``chunk_seed``), reseeding its generator."""
        for generator, seed in zip(self.generators, self.realizations.seeds, strict=True):
            generator.manual_seed(chunk_seed(seed, index))

    def select(self, indices: list[int]) -> RepeatedAnalogLayer:
        """The same layer with only the realizations ``indices`` (fresh generators from their seeds)."""
        other = copy.copy(self)
        other.realizations = self.realizations.select(indices)
        other.repeats = len(indices)
        other.generators = _generators(other.realizations.seeds, self.realizations.weights.device)
        return other

    # ----------------------------------------------------------------------------------------------- layer shape
    def __call__(self, x: torch.Tensor, folded: bool = False) -> torch.Tensor:
        conv = self.lay.conv
        if conv is None:
            lead = x.shape[:-1]
            rows = x.reshape(-1, x.shape[-1])
            out = self._rows(rows.view(self.repeats, -1, rows.shape[-1]) if folded else rows, folded)
            return out.reshape(self.repeats * (lead[0] // self.repeats if folded else lead[0]), *lead[1:], -1)
        if conv["one_d"]:
            x = x.unsqueeze(-2)
        batch = x.shape[0]
        if self.pooled:
            out, (out_h, out_w) = self._pooled_conv(x, folded)
            total = self.repeats * (batch // self.repeats if folded else batch)
            out = out.reshape(total, out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()
            return out.squeeze(-2) if conv["one_d"] else out
        patches = conv_patches(x, conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"])
        out_h, out_w = patches.shape[1:3]
        columns = patches.shape[-1]
        rows = patches.reshape(self.repeats, -1, columns) if folded else patches.reshape(-1, columns)
        out = self._rows(rows, folded)  # [R, B*L, out]
        total = self.repeats * (batch // self.repeats if folded else batch)
        out = out.reshape(total, out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()
        return out.squeeze(-2) if conv["one_d"] else out

    def _pooled_conv(self, x: torch.Tensor, folded: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """A convolution whose tiles each read whole input channels, without materializing patches: abs-max noise
        management as a max-pool, scaled rows written from a strided view of the input (``_Windows``)."""
        conv = self.lay.conv
        kernel, stride, padding, dilation = conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"]
        padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
        # Channels last, so each window's kernel position holds its channels side by side: the scaled rows are then
        # written from runs of C_i contiguous values, in (kernel row, kernel column, channel) order, and the
        # weights' columns are put in that order too (``_window_weights``): the same products, summed in another
        # order.
        padded = padded.contiguous(memory_format=torch.channels_last)
        n, channels, height, width = padded.shape
        blocks = self.geometry.plan[1]
        per_block = channels // blocks
        channel_max = padded.abs().view(n, blocks, per_block, height, width).amax(2)
        nm = F.max_pool2d(channel_max, kernel, stride, 0, dilation)  # [N, I, H', W']
        span_h, span_w = dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1
        windows = padded.unfold(2, span_h, stride[0]).unfold(3, span_w, stride[1])[..., :: dilation[0], :: dilation[1]]
        out_h, out_w = windows.shape[2:4]
        windows = windows.view(n, blocks, per_block, out_h, out_w, *kernel)  # [N, I, C_i, H', W', kh, kw]
        if folded:  # -> [R, I, B, H', W', kh, kw, C_i]
            windows = windows.view(self.repeats, n // self.repeats, *windows.shape[1:]).permute(0, 2, 1, 4, 5, 6, 7, 3)
            nm = nm.view(self.repeats, n // self.repeats, blocks, out_h, out_w).permute(0, 2, 1, 3, 4)
        else:  # -> [I, N, H', W', kh, kw, C_i]
            windows = windows.permute(1, 0, 3, 4, 5, 6, 2)
            nm = nm.permute(1, 0, 2, 3)
        nm = nm.reshape(*nm.shape[:-3], -1, 1)  # [(R,) I, M, 1]
        source = _Windows(windows, nm, folded)
        y = self.mvm(source, self._window_weights(per_block, kernel), folded)
        return self._assemble(y, math.prod(source.rows), folded), (out_h, out_w)

    def _window_weights(self, channels: int, kernel: tuple[int, int]) -> torch.Tensor:
        """The realizations' weights [R, S, out, C_i*kh*kw] with their columns in the (kernel row, kernel column,
        channel) order ``_pooled_conv`` writes rows in (kept until the realizations change)."""
        weights = self.realizations.weights
        cached = getattr(self, "_window_cache", None)
        if cached is None or cached[0] is not weights:
            reordered = weights.view(*weights.shape[:3], channels, *kernel).permute(0, 1, 2, 4, 5, 3)
            self._window_cache = (weights, reordered.reshape(weights.shape))
        return self._window_cache[1]

    def _rows(self, rows: torch.Tensor, folded: bool) -> torch.Tensor:
        """The layer on input rows: [M, in] shared, or [R, M, in] folded -> [R, M, out]."""
        x = self.geometry.site_rows(rows)  # [(R,) S, M, in_max]
        return self._assemble(self.mvm(x, self.realizations.weights, folded), x.numel(), folded)

    def _assemble(self, y: torch.Tensor, input_numel: int, folded: bool) -> torch.Tensor:
        """Per-tile outputs [R, S, M, out_max] -> the layer's [R, M, out]: scales, tile sums, bias."""
        # Mapping scales, drift compensation alpha and learned output scales, in aihwkit's order, as one multiply.
        y = y.mul_(self.mapping[None, :, None, :] * self.realizations.alpha[:, :, None, None]
                   * self.out_scales[None, :, None, :])
        repeats = y.shape[0]
        # Working set per call (input rows, their gathered and prepared copies, outputs and noise): sizes the
        # number of repeats the evaluator folds into one pass.
        self.peak_bytes = max(getattr(self, "peak_bytes", 0),
                              3 * (input_numel * (repeats if not folded else 1) + y.numel()) * y.element_size())
        out = self.geometry.combine(y, self.lay.out_features)
        if self.lay.bias is not None:
            out = out + self.lay.bias.detach()
        return out

    def readout(self, weights: torch.Tensor) -> torch.Tensor:
        """GlobalDriftCompensation's read-out, per (repeat, tile): mean |tile forward of eye(in)| (clamped at 1e-4),
        over each tile's own rows and columns."""
        geometry = self.geometry
        eye = torch.eye(geometry.in_max, device=weights.device, dtype=weights.dtype)
        x = eye.expand(len(self.lay.sites), -1, -1) * geometry.valid_in[:, :, None]  # [S, in_max, in_max]
        y = self.mvm(x, weights, folded=False).abs()  # [R, S, in_max, out_max]
        valid = (geometry.valid_in[:, :, None] & geometry.valid_out[:, None, :]).to(y.dtype)
        mean = (y * valid).sum(dim=(-2, -1)) / valid.sum(dim=(-2, -1))
        return mean.clamp(min=0.0001)

    # ----------------------------------------------------------------------------------------------- periphery
    def mvm(self, x: Any, weights: torch.Tensor, folded: bool) -> torch.Tensor:
        """aihwkit's ``AnalogMVM.matmul`` per (repeat, tile): x [S, M, in] shared or [R, S, M, in]; weights
        [R, S, out, in] -> [R, S, M, out].

        The arithmetic is aihwkit's, reordered to touch each element fewer times: the input is scaled straight to
        integer DAC levels (round, clip), the matmul runs on levels, output noise is added in level units, the
        output rounded to ADC levels and clipped, and one multiply per row and per column scales back. Results
        agree with the tile to float rounding (a value that lands on a quantization boundary may round the other
        way)."""
        from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

        io = self.io
        repeats, sites = weights.shape[:2]
        source = x if isinstance(x, _Windows) else None
        if source is None:
            if io.is_perfect:
                return self._matmul(x, weights, folded)
            if io.inp_noise > 0.0 and self.noise and not folded:  # input noise differs per repeat
                x, folded = x.expand(repeats, *x.shape), True
            source = _Rows(x, folded)
        x = source
        nm = source.noise_management(self)  # [(R,) S, M, 1] or a number
        zero = None
        if isinstance(nm, torch.Tensor):
            if io.inp_noise <= 0.0:
                zero = (nm == 0.0).all(dim=-2).squeeze(-1)  # [(R,) S]: aihwkit returns zeros for an all-zero call
            nm = nm.masked_fill(nm <= 0.0, 1.0)
        scale = 1.0 / nm if io.noise_management != NoiseManagementType.NONE else 1.0
        if io.bound_management == BoundManagementType.NONE:
            _, out, unit = self._analog_mv(x, weights, scale, folded)
            out = out.mul_(_expand(unit * io.out_scale / scale, repeats, folded) if isinstance(scale, torch.Tensor)
                           else unit * io.out_scale / scale)
        else:
            out = self._bound_managed(x, weights, scale, folded)
        if zero is not None and bool(zero.any()):
            zero = zero.expand(repeats, sites) if zero.dim() == 1 else zero
            out = out.masked_fill(zero[:, :, None, None], 0.0)
        return out

    def _bound_managed(self, x: Any, weights: torch.Tensor, scale: Any, folded: bool) -> torch.Tensor:
        """Iterative bound management, as aihwkit's loop but per (repeat, tile) call: a call whose output clips is
        run again with its input scaled down by 2 (until it passes or the limits of ``max_bm_factor`` /
        ``max_bm_res`` are reached)."""
        io = self.io
        repeats, sites = weights.shape[:2]
        limit = max_reduction(io)
        full_scale = _expand(scale, repeats, folded)
        passed, out, unit = self._analog_mv(x, weights, scale, folded)  # every call at reduction 1, shared x once
        out = out.mul_(unit * io.out_scale / full_scale)
        reduction = 1.0
        pending = ~passed
        while bool(pending.any()):
            if reduction > limit:
                break
            reduction *= 2.0
            index = pending.nonzero(as_tuple=True)
            self.bound_reruns = getattr(self, "bound_reruns", 0) + len(index[0])
            sub_scale = (full_scale[index] / reduction)[None] if isinstance(full_scale, torch.Tensor) \
                else full_scale / reduction
            ok, result, unit = self._analog_mv(x.subset(index, repeats), weights[index][None], sub_scale, True,
                                               repeat_index=index[0], site_index=index[1])
            out[index] = result.mul_(unit * io.out_scale / sub_scale)[0]
            still = torch.zeros_like(pending)
            still[index] = ~ok[0]
            pending = still
        return out

    def _noise_management(self, x: torch.Tensor) -> Any:
        from aihwkit.simulator.parameters.enums import NoiseManagementType

        io = self.io
        if io.noise_management == NoiseManagementType.ABS_MAX:  # one pass, no |x| temporary
            low, high = torch.aminmax(x, dim=-1, keepdim=True)
            abs_max = torch.maximum(high, -low)
            return abs_max.clamp(max=io.nm_thres) if io.nm_thres > 0.0 else abs_max
        from aihwkit.simulator.tiles.analog_mvm import AnalogMVM

        return AnalogMVM._compute_noise_management(x, io.noise_management, io)

    def _analog_mv(self, x: Any, weights: torch.Tensor, scale: Any, folded: bool,
                   repeat_index: torch.Tensor | None = None, site_index: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """aihwkit's ``_compute_analog_mv`` (prepare input, matmul, finalize output) with the bound test per call:
        (passed [R, S], output in units of ``unit``, unit). ``repeat_index``/``site_index``: the (repeat, tile) of
        each call of a bound-management rerun ([1, K, ...] tensors)."""
        io = self.io
        # Input: scaled, rounded to DAC levels of the bound, clipped (aihwkit's _prepare_input), kept in level units
        # with the same float steps as aihwkit ((x * scale) / step, round: the row maximum lands exactly on a
        # rounding boundary under bound management, so the order matters).
        in_step = quantization_step(io.inp_res, io.inp_bound)
        if repeat_index is None and in_step and isinstance(scale, torch.Tensor) and row_maximum_level_is_whole(io):
            # The first pass: one multiply by scale / step (the row maximum lands on the top level exactly
            # either way); a bound-management rerun keeps aihwkit's order (x * scale) / step, under which the
            # halved row maximum lands exactly on a rounding boundary.
            levels = x.scaled(scale / in_step).round_()
        else:
            levels = x.scaled(scale)
            if in_step:
                levels = levels.div_(in_step).round_()
        in_bound = io.inp_bound / in_step if in_step else io.inp_bound
        if input_clip_needed(io, isinstance(scale, torch.Tensor)):
            levels = levels.clamp_(-in_bound, in_bound)
        if io.inp_noise > 0.0 and self.noise:
            levels = levels.add_(self._normal_like(levels, repeat_index), alpha=io.inp_noise / (in_step or 1.0))
        if io.inp_asymmetry != 0.0:
            levels = torch.where(levels < 0, levels * (1.0 - io.inp_asymmetry), levels)
        # The matmul on levels against weights times the DAC step: output in aihwkit's units.
        out = self._matmul(levels, weights * in_step if in_step else weights, folded)
        if not folded:
            out = out.contiguous()
        # Output: asymmetry, noise, ADC rounding, bound test and clip (aihwkit's _finalize_output).
        if io.out_asymmetry != 0.0:
            out = torch.where(out < 0, out * (1.0 - io.out_asymmetry), out)
        if io.out_noise > 0.0 and self.noise:
            out = out.add_(self._normal_like(out, repeat_index), alpha=io.out_noise)
        out_step = quantization_step(io.out_res, io.out_bound)
        unit = 1.0
        if out_step:
            out = out.div_(out_step).round_()
            unit = out_step
        valid = self.geometry.valid_out if site_index is None else self.geometry.valid_out[site_index]
        # Padded outputs of smaller tiles do not take part in the bound test.
        low, high = torch.aminmax((out.masked_fill(~valid[None, :, None, :], 0.0) if self.geometry.padded
                                   else out).flatten(-2), dim=-1)
        if io.out_bound > 0:  # tested in output units as aihwkit does (the top level times the step may exceed it)
            passed = (high * unit <= io.out_bound) & (low * unit >= -io.out_bound)
            out = out.clamp_(-io.out_bound / unit, io.out_bound / unit)
        else:
            passed = torch.ones_like(high, dtype=torch.bool)
        return passed, out, unit

    def _matmul(self, x: torch.Tensor, weights: torch.Tensor, folded: bool) -> torch.Tensor:
        repeats, sites, out_size, in_size = weights.shape
        if folded:  # [R, S, M, in] x [R, S, out, in]
            m = x.shape[-2]
            product = torch.bmm(x.reshape(repeats * sites, m, in_size),
                                weights.reshape(repeats * sites, out_size, in_size).transpose(1, 2))
            return product.view(repeats, sites, m, out_size)
        # Shared input [S, M, in]: one GEMM per tile against all R realizations side by side.
        m = x.shape[-2]
        stacked = weights.permute(1, 3, 0, 2).reshape(sites, in_size, repeats * out_size)
        product = torch.bmm(x, stacked).view(sites, m, repeats, out_size)
        return product.permute(2, 0, 1, 3)

    def _normal_like(self, values: torch.Tensor, repeat_index: torch.Tensor | None) -> torch.Tensor:
        """Standard normal noise of ``values``' shape [R or 1, ...], repeat r's from its own generator."""
        noise = torch.empty_like(values)
        if repeat_index is None:
            for r, generator in enumerate(self.generators):
                noise[r].normal_(generator=generator)
        else:  # rows of a bound-management rerun: [1, K, ...], row k belongs to repeat repeat_index[k]
            for k, r in enumerate(repeat_index.tolist()):
                noise[0, k].normal_(generator=self.generators[r])
        return noise


class _Rows:
    """A layer's input rows, materialized: [S, M, in] shared by the repeats or [R, S, M, in] folded."""

    def __init__(self, x: torch.Tensor, folded: bool) -> None:
        self.x, self.folded = x, folded

    def noise_management(self, layer: RepeatedAnalogLayer) -> Any:
        return layer._noise_management(self.x)

    def scaled(self, scale: Any) -> torch.Tensor:
        """x * scale, contiguous (for the batched matmul)."""
        shape = torch.broadcast_shapes(self.x.shape, scale.shape) if isinstance(scale, torch.Tensor) else self.x.shape
        out = torch.empty(shape, dtype=self.x.dtype, device=self.x.device)
        return torch.mul(self.x, scale, out=out)

    def subset(self, index: tuple[torch.Tensor, torch.Tensor], repeats: int) -> _Rows:
        """The rows of the (repeat, tile) calls ``index``, as one folded call group [1, K, M, in]."""
        full = self.x if self.folded else self.x.expand(repeats, *self.x.shape)
        return _Rows(full[index][None], True)


class _Windows:
    """A convolution's input rows as a strided view of its (padded, channels-last) input, never materialized as
    patches: ``windows`` [(R,) I, B, H', W', kh, kw, C_i] for I tiles that each read whole channels. Abs-max noise
    management is a max-pool of the per-pixel channel maximum; scaled rows are written straight into the
    contiguous [(R,) I, M, C_i*kh*kw] layout the matmul reads."""

    def __init__(self, windows: torch.Tensor, nm: torch.Tensor, folded: bool) -> None:
        self.windows, self.nm, self.folded = windows, nm, folded
        self.rows = (*windows.shape[:-6], math.prod(windows.shape[-6:-3]), math.prod(windows.shape[-3:]))

    def noise_management(self, layer: RepeatedAnalogLayer) -> torch.Tensor:
        return self.nm

    def scaled(self, scale: Any) -> torch.Tensor:
        out = torch.empty(self.windows.shape, dtype=self.windows.dtype, device=self.windows.device)
        if isinstance(scale, torch.Tensor):
            scale = scale.reshape(*scale.shape[:-2], *self.windows.shape[-6:-3], 1, 1, 1)
        return torch.mul(self.windows, scale, out=out).view(self.rows)

    def subset(self, index: tuple[torch.Tensor, torch.Tensor], repeats: int) -> _Rows:
        full = self.windows if self.folded else self.windows.expand(repeats, *self.windows.shape)
        picked = full[index]  # [K, B, H', W', kh, kw, C_i]
        return _Rows(picked.reshape(1, picked.shape[0], *self.rows[-2:]), True)


def _expand(scale: Any, repeats: int, folded: bool) -> Any:
    """A shared input's per-row scale [S, M, 1] as the folded [R, S, M, 1] (numbers stay numbers)."""
    if isinstance(scale, torch.Tensor) and not folded:
        return scale.expand(repeats, *scale.shape)
    return scale
