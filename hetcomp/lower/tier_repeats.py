"""Repeat-vectorized forwards of the torch tier simulators (PIM crossbar, photonic) and of row-split layers.

These devices have no programming state: a hardware repeat is one independent forward of the lowered module, whose
noise (conductance read noise, the photonic operands' relative noise) is drawn on that read. ``RepeatedTierLayer``
computes R such forwards at once, with the repeats folded into the batch ([R*B, ...], repeat-major), using
``tier_sim``'s own arithmetic (``quantize``, ``crossbar_integers``, ``read_sigma``, ``PhotonicCore._operand``,
``output_quantize``) with a leading repeat dimension:

- **Per-call reductions stay per repeat.** Every max-abs scale (inputs, a dynamic product's operands, the photonic
  output quantizer) is taken over that repeat's rows only, so repeat r computes what a separate forward of the
  module on the same batch computes for the same noise draw.
- **Randomness.** Repeat r draws from its own ``torch.Generator`` seeded by ``noise_seeds[r]`` (restarted from
  ``chunk_seed(noise_seeds[r], chunk)`` at each data chunk the evaluator runs: ``at_chunk``), in the order and shapes
  the module's forward draws from torch's RNG (group by group, operand by operand): the result does not depend on how
  repeats are grouped, blocked or split over ranks, and on the CPU repeat r equals a forward of the module after
  ``torch.manual_seed`` of that seed (tested).
- **Shared work.** A shared input ([B, ...], ``folded=False``) is quantized once; a noise-free crossbar (SRAM, or
  ``noise=False``) reads the same cells for every repeat, so folded repeats are just more rows of one integer matmul;
  a ReRAM read whose noise is rounded away in every repeat (the usual case) keeps one effective integer weight.
  A layer with nothing random and a shared input runs once and is tiled.
- **Memory.** Repeats run in blocks whose per-repeat working set (inputs, outputs, each repeat's noisy conductances
  or weights) fits ``block_bytes``; ``peak_bytes`` reports the working set for the evaluator's chunk sizing.

``RepeatedRowSplit`` composes a row-split layer's parts: tier parts share the split's generators (drawing in part
order, as ``RowSplit.forward`` does), parts of other simulators (PCM) get their own ``repeated`` form from seeds
derived per part, and a digital part runs once on whatever it is given (tiled when the input is shared).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from hetcomp.errors import TraceError
from hetcomp.lower import tier_sim
from hetcomp.lower.repeats import chunk_seed, layer_seed
from hetcomp.lower.row_split import RowSplit, place_rows
from hetcomp.lower.simulator import Simulator, build_repeated, simulator_named
from hetcomp.lower.tier_sim import (
    PhotonicCore,
    PimCrossbarCore,
    UnfoldConv,
    crossbar_integers,
    output_quantize,
    read_sigma,
)

Randn = Callable[[torch.Tensor], torch.Tensor]


class NoiseDraws:
    """One ``torch.Generator`` per repeat, seeded by that repeat's noise seed (made lazily, on the device of the
    first tensor drawn for). ``block(start, stop)`` is a view on some repeats that shares the generators (their
    state advances); ``select`` starts fresh generators from the seeds."""

    def __init__(self, seeds: Sequence[int], parent: NoiseDraws | None = None, start: int = 0) -> None:
        self.seeds = [int(seed) for seed in seeds]
        self._parent, self._start = parent, start
        self._generators: list[torch.Generator] | None = None
        self._chunk: int | None = None  # at_chunk's data chunk: the generators start from its seeds

    def at_chunk(self, index: int) -> None:
        """Restart every repeat's generator for data chunk ``index`` (``chunk_seed``; a view restarts its parent)."""
        if self._parent is not None:
            self._parent.at_chunk(index)
            return
        self._chunk = index
        for generator, seed in zip(self._generators or [], self.seeds, strict=False):  # made lazily otherwise
            generator.manual_seed(chunk_seed(seed, index))

    def __len__(self) -> int:
        return len(self.seeds)

    def generators(self, device: torch.device) -> list[torch.Generator]:
        if self._parent is not None:
            return self._parent.generators(device)[self._start : self._start + len(self.seeds)]
        if self._generators is None:
            seeds = self.seeds if self._chunk is None else [chunk_seed(seed, self._chunk) for seed in self.seeds]
            self._generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        return self._generators

    def block(self, start: int, stop: int) -> NoiseDraws:
        return NoiseDraws(self.seeds[start:stop], self, start)

    def select(self, indices: Sequence[int]) -> NoiseDraws:
        return NoiseDraws([self.seeds[i] for i in indices])

    def randn(self, per_repeat: bool) -> Randn:
        """``randn(t)`` for ``tier_sim``'s noise functions: [R, ...] standard normal noise, repeat r's slice from its
        generator. ``per_repeat``: ``t`` already has the repeat dimension (repeat r draws for ``t[r]``); otherwise
        ``t`` is shared and every repeat draws for ``t``. Each repeat's draw is ``tier_sim.standard_normal``'s (row-
        major, whatever ``t``'s layout), so it is the module's draw."""

        def draw(t: torch.Tensor) -> torch.Tensor:
            generators = self.generators(t.device)
            out = torch.empty((len(generators), *(t.shape[1:] if per_repeat else t.shape)), dtype=t.dtype,
                              device=t.device)
            for r, g in enumerate(generators):  # filled in place, repeat by repeat
                out[r].normal_(generator=g)
            return out

        return draw


def _cores(module: nn.Module) -> list[nn.Module]:
    return list(module.cores) if isinstance(module, UnfoldConv) else [module]


def tier_unsupported(module: nn.Module) -> str | None:
    """Why ``module`` (a lowered tier simulation) has no repeat-vectorized forward; None: it has one."""
    cores = _cores(module)
    if not all(isinstance(core, PimCrossbarCore | PhotonicCore) for core in cores):
        return f"{type(module).__name__} is not a PIM crossbar or photonic simulation module"
    if any(m.training for m in module.modules()):
        return ("the module is in training mode (LSQ sets and trains its steps there); hardware repeats are "
                "evaluated in eval mode")
    return None


def _which_folded(x: torch.Tensor, other: torch.Tensor, repeats: int, folded: bool) -> tuple[bool, bool]:
    """Which of a two-input layer's inputs carry the repeats ([R*B, ...]) when the caller says some do."""
    if not folded:
        return False, False
    if repeats == 1 or x.shape[0] == other.shape[0]:
        return True, True
    if x.shape[0] == repeats * other.shape[0]:
        return True, False
    if other.shape[0] == repeats * x.shape[0]:
        return False, True
    raise TraceError(f"folded inputs of {repeats} repeats: leading dimensions {x.shape[0]} and {other.shape[0]} "
                     "are neither equal nor one R times the other")


def _tile(y: torch.Tensor, repeats: int) -> torch.Tensor:
    """A shared output [B, ...] for every repeat: [R*B, ...]."""
    return y.repeat(repeats, *([1] * (y.dim() - 1))) if repeats > 1 else y


class RepeatedTierLayer:
    """A lowered PIM crossbar / photonic layer (``PimCrossbarCore``, ``PhotonicCore``, ``UnfoldConv``) run for R
    hardware repeats at once (see the module docstring). Called as ``(x, folded=...)`` or, for a dynamic product,
    ``(a, b, folded=...)``: inputs shared [B, ...] or folded [R*B, ...] (with two inputs one may be shared while the
    other is folded); the output is folded. ``noise = False`` turns the forward noise off; ``select(indices)`` keeps
    some repeats (fresh generators from their seeds); ``peak_bytes`` is the working set of the largest call so far;
    ``block_bytes`` (None: 1 GiB on CPU, 4 GiB on CUDA) bounds the repeats run at once. The module is not
    changed."""

    def __init__(self, module: nn.Module, draws: NoiseDraws, block_bytes: int | None = None) -> None:
        self.module = module
        self.cores = _cores(module)
        self.draws = draws
        self.repeats = len(draws)
        self.noise = True
        self.peak_bytes = 0
        self.block_bytes = block_bytes
        self._sigma: dict[int, tuple[Any, torch.Tensor]] = {}  # each ReRAM core's read_sigma, by id

    def select(self, indices: Sequence[int]) -> RepeatedTierLayer:
        return self.with_draws(self.draws.select(indices))

    def at_chunk(self, index: int) -> None:
        self.draws.at_chunk(index)

    def with_draws(self, draws: NoiseDraws) -> RepeatedTierLayer:
        """The same layer drawing from ``draws`` (a row split's parts share its generators)."""
        other = copy.copy(self)
        other.draws, other.repeats = draws, len(draws)
        return other

    @property
    def random(self) -> bool:
        """Whether a forward draws noise (else every repeat of a shared input computes the same)."""
        if not self.noise:
            return False
        return any(bool(core.settings.get("conductance_noise")) if isinstance(core, PimCrossbarCore)
                   else bool(core.settings["input_noise_rel"]) for core in self.cores)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, other: torch.Tensor | None = None, folded: bool = False) -> torch.Tensor:
        repeats = self.repeats
        x_rep, o_rep = (folded, False) if other is None else _which_folded(x, other, repeats, folded)
        if tier_sim._IDEAL[0]:  # exact float layer: per sample, so it runs on the folded batch as is
            if other is not None and x_rep != o_rep:
                x, other = (x, _tile(other, repeats)) if x_rep else (_tile(x, repeats), other)
            y = self.module(x) if other is None else self.module(x, other)
            return y if x_rep or o_rep else _tile(y, repeats)
        per_repeat = self._per_repeat_bytes(x, other, x_rep, o_rep)
        held = (x.numel() // (repeats if x_rep else 1)
                + (0 if other is None else other.numel() // (repeats if o_rep else 1)))  # one repeat's inputs
        if not (x_rep or o_rep or self.random):  # the same read for every repeat: once, then tiled
            self.peak_bytes = max(self.peak_bytes, 2 * repeats * held * x.element_size() + per_repeat)
            return _tile(self._block(x, other, False, False, self.draws.block(0, 1), 1), repeats)
        batch = (x.shape[0] // repeats) if x_rep else x.shape[0]
        budget = self.block_bytes or ((4 << 30) if x.device.type == "cuda" else (1 << 30))
        size = max(1, min(repeats, budget // max(per_repeat, 1)))
        out = None
        for start in range(0, repeats, size):
            stop = min(start + size, repeats)
            xb = x[start * batch : stop * batch] if x_rep else x
            ob = None if other is None else (other[start * batch : stop * batch] if o_rep else other)
            y = self._block(xb, ob, x_rep, o_rep, self.draws.block(start, stop), stop - start)
            if size >= repeats:
                out = y
                break
            if out is None:  # blocks write into one output: no concatenated copy
                out = y.new_empty((repeats * batch, *y.shape[1:]))
            out[start * batch : stop * batch] = y
        # the folded inputs and outputs of every repeat, and one block's working set
        self.peak_bytes = max(self.peak_bytes, 2 * repeats * held * x.element_size() + size * per_repeat)
        return out

    def _per_repeat_bytes(self, x: torch.Tensor, other: torch.Tensor | None, x_rep: bool, o_rep: bool) -> int:
        """Working set of one repeat: its input rows (patches for a conv), output, and the noisy copy of the
        weights it reads (a ReRAM repeat's conductances, a photonic repeat's weight), with temporaries."""
        one = x[:1]
        if isinstance(self.module, UnfoldConv):
            patches = self.module.patches(one)[0]
            per_sample_in = patches.numel()
            per_sample_out = patches.shape[1] * sum(core.weight.shape[0] for core in self.cores)
        elif other is not None:  # a dynamic product
            per_sample_in = one.numel() + other[:1].numel()
            per_sample_out = one.numel() // one.shape[-1] * other.shape[-1]
        else:
            per_sample_in = one.numel()
            per_sample_out = one.numel() // one.shape[-1] * self.cores[0].weight.shape[0]
        samples = x.shape[0] // self.repeats if x_rep else x.shape[0]
        weights = 0
        if self.noise:
            for core in self.cores:
                if isinstance(core, PimCrossbarCore) and core.settings.get("conductance_noise"):
                    s = core.settings
                    slices = math.ceil((s["weight_bits"] - 1) / s["cell_bits"])
                    weights += 6 * 2 * slices * core.weight.numel()  # conductances, noisy cells, spread, effective
                elif isinstance(core, PhotonicCore) and core.weight is not None and core.settings["input_noise_rel"]:
                    weights += 3 * core.weight.numel()
        return x.element_size() * (3 * samples * (per_sample_in + per_sample_out) + weights)

    def _block(self, x: torch.Tensor, other: torch.Tensor | None, x_rep: bool, o_rep: bool, draws: NoiseDraws,
               n: int) -> torch.Tensor:
        """The layer for ``n`` repeats (``draws``): inputs of those repeats ([n*B, ...]) or shared; [n*B, ...].
        Folded inputs are viewed [n, B, ...], never copied: an operand keeps the memory layout the module's forward
        sees (a conv's patches are a transposed view), so noise drawn for it fills the same elements."""
        module = self.module
        if other is not None:
            return self._dynamic(module, x, other, x_rep, o_rep, draws, n)
        if isinstance(module, UnfoldConv):
            patches, out_h = module.patches(x)  # [(n*)B, L, C*k]
            width = patches.shape[-1] // len(self.cores)
            parts = []
            for g, core in enumerate(self.cores):
                cols = patches[..., g * width : (g + 1) * width]
                parts.append(self._rows(core, cols.view(n, -1, *cols.shape[1:]) if x_rep else cols, x_rep, draws, n))
            y = torch.cat(parts, -1)  # [n, B, L, out]
            return module.assemble(y.reshape(-1, *y.shape[2:]), out_h)
        y = self._rows(module, x.view(n, -1, *x.shape[1:]) if x_rep else x, x_rep, draws, n)  # [n, B, ..., out]
        return y.reshape(-1, *y.shape[2:])

    def _rows(self, core: nn.Module, x: torch.Tensor, per_repeat: bool, draws: NoiseDraws, n: int) -> torch.Tensor:
        """One weight-static core on its input [..., K] shared or [n, ..., K]: [n, ..., out]."""
        if isinstance(core, PimCrossbarCore):
            rows = x.reshape(n, -1, x.shape[-1]) if per_repeat else x.reshape(-1, x.shape[-1])
            y = self._crossbar(core, rows, per_repeat, draws)  # [n, M, out] or [M, out]
            y = y.view(*x.shape[:-1], -1) if y.dim() == rows.dim() else y.view(n, *x.shape[:-1], -1)
        else:  # PhotonicCore.product (eval) with its stored weight
            a = core._operand("input", x, draws.randn(per_repeat), per_repeat, self.noise)
            b = core._operand("weight", core.weight.t(), draws.randn(False), False, self.noise)
            k, lead = x.shape[-1], x.shape[1:-1] if per_repeat else x.shape[:-1]
            a_rep, b_rep = per_repeat or a.dim() > x.dim(), b.dim() == 3  # folded, or noise drawn per repeat
            if a_rep or b_rep:  # one [M, K] @ [K, out] per repeat, the module's matmul: the same float sums
                a = a.reshape(n, -1, k) if a_rep else a.reshape(-1, k)
                y = a.new_empty((n, a.shape[-2], b.shape[-1]))
                for r in range(n):
                    torch.mm(a[r] if a_rep else a, b[r] if b_rep else b, out=y[r])
                y = y.view(n, *lead, -1)
            else:
                y = (a.reshape(-1, k) @ b).view(*lead, -1)
            y = output_quantize(y, core.settings["output_bits"], per_repeat=a_rep or b_rep, inplace=True)
        if core.bias is not None:
            y = y.add_(core.bias)  # y is this call's own tensor
        sample_dims = x.dim() - 2 if per_repeat else x.dim() - 1  # one repeat's input dims before K
        return y if y.dim() == sample_dims + 2 else y.expand(n, *y.shape)

    def _crossbar(self, core: PimCrossbarCore, rows: torch.Tensor, per_repeat: bool, draws: NoiseDraws
                  ) -> torch.Tensor:
        """``PimCrossbarCore.forward`` (eval) on [M, K] or [n, M, K] rows, before the bias: the same quantization,
        noise draw and ``crossbar_integers``; [M, out] when nothing differs between repeats."""
        s = core.settings
        xq, x_scale = core._quantize("input", rows, per_repeat)
        _, w_scale, digits = core._cells()
        noise = s.get("conductance_noise") if self.noise else None
        read = None
        if noise:  # read_sigma x N(0, 1) as the module draws it (the product commutes: bit for bit)
            key = (digits.data_ptr(), digits._version, tuple(sorted(noise.items())))
            if self._sigma.get(id(core), (None,))[0] != key:  # the same cells for every block and data chunk
                self._sigma[id(core)] = (key, read_sigma(digits, 2 ** s["cell_bits"] - 1, noise))
            read = draws.randn(False)(digits).mul_(self._sigma[id(core)][1])
        out = crossbar_integers(xq, digits, read, s)
        return out * (x_scale * w_scale)

    def _dynamic(self, core: PhotonicCore, a: torch.Tensor, b: torch.Tensor, a_rep: bool, b_rep: bool,
                 draws: NoiseDraws, n: int) -> torch.Tensor:
        """``PhotonicCore.product`` (eval) for ``n`` repeats: a folded operand is viewed [n, B, ...] and quantized
        per repeat, a shared one once (each repeat still draws its own noise for it)."""
        if a_rep:
            a = a.reshape(n, -1, *a.shape[1:])
        if b_rep:
            b = b.reshape(n, -1, *b.shape[1:])
        a_op = core._operand("input", a, draws.randn(a_rep), a_rep, self.noise)
        b_op = core._operand("other", b, draws.randn(b_rep), b_rep, self.noise)
        # per repeat: a folded operand, or a shared one that drew its noise per repeat (a leading dimension more)
        per_repeat = a_rep or b_rep or a_op.dim() > a.dim() or b_op.dim() > b.dim()
        y = torch.matmul(a_op, b_op)
        y = output_quantize(y, core.settings["output_bits"], per_repeat=per_repeat, inplace=True)
        if not per_repeat:
            y = y.expand(n, *y.shape)
        return y.reshape(-1, *y.shape[2:])


def _part_seeds(seeds: Sequence[int], tier: str) -> list[int]:
    """A row split's part on another device (PCM) programs and reads from seeds of its own."""
    return [layer_seed(seed, "row part", tier) for seed in seeds]


def _programmed_parts(module: RowSplit) -> dict[str, Simulator]:
    """The parts of ``module`` on a device that programs its state (not digital, not a torch tier's per-read
    noise), with their simulators."""
    parts = {}
    for tier in module.parts:
        name = module.simulators[tier]
        if name is not None and not isinstance(simulator_named(name), tier_sim._TorchTierSimulator):
            parts[tier] = simulator_named(name)
    return parts


def part_programs(module: RowSplit, t_inference: float, program_seeds: Sequence[int]) -> dict[str, list[torch.Tensor]]:
    """Per part that programs its state: its simulator's ``programs`` for the repeats ``program_seeds``."""
    return {tier: simulator.programs(module.parts[tier], t_inference, _part_seeds(program_seeds, tier))
            for tier, simulator in _programmed_parts(module).items()}


class RepeatedRowSplit:
    """A ``RowSplit`` layer for R hardware repeats (see the module docstring): called like ``RepeatedTierLayer``,
    each part's output (folded) is put at its rows. ``programmed``: the parts' programmed states as
    ``RowSplitSimulator.programs`` lists them (part after part), drawn already (None: drawn here)."""

    def __init__(self, module: RowSplit, t_inference: float, program_seeds: Sequence[int],
                 noise_seeds: Sequence[int], programmed: list[torch.Tensor] | None = None) -> None:
        self.module = module
        self.draws = NoiseDraws(noise_seeds)
        self.repeats = len(self.draws)
        programmed_parts = _programmed_parts(module)
        states: dict[str, list[torch.Tensor] | None] = dict.fromkeys(programmed_parts)
        if programmed is not None:  # split back by how many tensors each part's state has (an empty draw tells)
            remaining = list(programmed)
            for tier, simulator in programmed_parts.items():
                count = len(simulator.programs(module.parts[tier], t_inference, []))
                states[tier], remaining = remaining[:count], remaining[count:]
        self.parts: dict[str, Any] = {}
        for tier, part in module.parts.items():
            if module.simulators[tier] is None:
                self.parts[tier] = None  # digital: runs once
            elif tier not in programmed_parts:  # draws as RowSplit.forward does
                self.parts[tier] = RepeatedTierLayer(part, self.draws)
            else:  # another device's repeats (PCM): programmed and read from seeds of their own
                self.parts[tier] = build_repeated(
                    programmed_parts[tier], part, t_inference, _part_seeds(program_seeds, tier),
                    _part_seeds(noise_seeds, tier), states[tier])
        self._noise = True

    @property
    def noise(self) -> bool:
        return self._noise

    @noise.setter
    def noise(self, value: bool) -> None:
        self._noise = value
        for layer in self.parts.values():
            if layer is not None:
                layer.noise = value

    @property
    def peak_bytes(self) -> int:
        return sum(getattr(layer, "peak_bytes", 0) for layer in self.parts.values() if layer is not None)

    def at_chunk(self, index: int) -> None:
        self.draws.at_chunk(index)  # the tier parts' generators
        for layer in self.parts.values():
            if layer is not None and not isinstance(layer, RepeatedTierLayer):
                getattr(layer, "at_chunk", lambda index: None)(index)

    def select(self, indices: Sequence[int]) -> RepeatedRowSplit:
        other = copy.copy(self)
        other.draws = self.draws.select(indices)
        other.repeats = len(indices)
        other.parts = {tier: None if layer is None else
                       layer.with_draws(other.draws) if isinstance(layer, RepeatedTierLayer) else layer.select(indices)
                       for tier, layer in self.parts.items()}
        return other

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, other: torch.Tensor | None = None, folded: bool = False) -> torch.Tensor:
        module, repeats = self.module, self.repeats
        x_rep, o_rep = (folded, False) if other is None else _which_folded(x, other, repeats, folded)
        out = None
        for tier, part in module.parts.items():
            index = module.rows(tier)
            layer = self.parts[tier]
            if other is not None:
                args = [x, other.index_select(-1, index)]
            else:
                args = [x.index_select(1, getattr(module, f"inputs_{tier}")) if module.selects_inputs else x]
            if layer is not None:
                y = layer(*args, folded=x_rep or o_rep)
            elif x_rep or o_rep:  # digital on the folded batch: per sample, so one pass serves every repeat
                if other is not None and x_rep != o_rep:
                    args = [args[0], _tile(args[1], repeats)] if x_rep else [_tile(args[0], repeats), args[1]]
                y = part(*args)
            else:  # digital on a shared input: once, tiled
                y = _tile(part(*args), repeats)
            out = place_rows(out, y, index, module.dim, module.out_rows)
        return out


def row_split_unsupported(module: nn.Module) -> str | None:
    """Why a ``RowSplit`` has no repeat-vectorized forward: the first part whose simulator has none."""
    if not isinstance(module, RowSplit):
        return f"{type(module).__name__} is not a RowSplit"
    for tier, part in module.parts.items():
        name = module.simulators[tier]
        reason = None if name is None else simulator_named(name).repeats_unsupported(part)
        if reason is not None:
            return f"its rows on {tier!r}: {reason}"
    return None
