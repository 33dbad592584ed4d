"""Analytic energy/latency models of a tier, as data plus three parametric families.

A tier's cost is a throughput and a per-MAC energy (H3PIMAP Eq. 2 sums energy and takes the max of
latency over the tiers of a layer; both are linear in the rows a tier runs):

    latency(macs) = macs / macs_per_second
    energy(macs)  = macs * sum(term.energy_pj * term.events_per_mac) * 1e-12 + static_power_w * latency(macs)

``static_power_w`` is drawn while the tier is busy (laser, leakage, clocking). The families below derive
``macs_per_second`` and ``events_per_mac`` from the geometry in H3PIMAP Table I; each target file names the
source of every per-event energy next to it. Anything fitted rather than taken from a source is listed in
``calibration`` (what was fitted, to what), so a report can say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hetcomp.errors import TargetError

# Per-event energies shared by several tiers, (pJ, source).
# ISAAC Table I: 1-bit DACs 4 mW for 8x128 -> 3.9 uW each, for one 10 ns cycle at 100 MHz.
ISAAC_DAC_1BIT_100MHZ = (0.039, "ISAAC (ISCA'16) Table I 1-bit DAC, 3.9 uW x 10 ns")
# ISAAC: S+A 0.2 mW per IMA serving 8 ADCs at 1.28 GS/s -> 0.0195 pJ per conversion.
ISAAC_SHIFT_ADD = (0.0195, "ISAAC Table I shift-and-add, 0.2 mW / (8 x 1.28 GS/s)")


@dataclass(frozen=True)
class EnergyTerm:
    """One component's energy: ``energy_pj`` per event, ``events_per_mac`` events per 8-bit MAC."""

    name: str
    energy_pj: float
    events_per_mac: float
    source: str

    @property
    def pj_per_mac(self) -> float:
        return self.energy_pj * self.events_per_mac


@dataclass(frozen=True)
class CostModel:
    """Throughput and energy of one tier. ``placeholder=True``: not from any source; never report it."""

    macs_per_second: float | None = None
    terms: tuple[EnergyTerm, ...] = ()
    static_power_w: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, str] = field(default_factory=dict)
    placeholder: bool = False

    def __post_init__(self) -> None:
        if self.macs_per_second is not None and not self.macs_per_second > 0:
            raise TargetError(f"macs_per_second must be > 0, got {self.macs_per_second}")
        if self.static_power_w < 0 or any(t.energy_pj < 0 or t.events_per_mac < 0 for t in self.terms):
            raise TargetError("energies, event counts and static power must be >= 0")

    @property
    def modeled(self) -> bool:
        return self.macs_per_second is not None and not self.placeholder

    @property
    def energy_per_mac_pj(self) -> float:
        """Dynamic energy per MAC (static power excluded)."""
        return sum(term.pj_per_mac for term in self.terms)

    def latency_s(self, macs: np.ndarray | float) -> np.ndarray | float:
        if self.macs_per_second is None:
            raise TargetError("this cost model has no throughput (placeholder)")
        return np.asarray(macs, dtype=float) / self.macs_per_second

    def energy_j(self, macs: np.ndarray | float) -> np.ndarray | float:
        macs = np.asarray(macs, dtype=float)
        return macs * self.energy_per_mac_pj * 1e-12 + self.static_power_w * self.latency_s(macs)

    def breakdown(self) -> dict[str, float]:
        """pJ per MAC by component, static power spread at full throughput included."""
        parts = {term.name: term.pj_per_mac for term in self.terms}
        if self.static_power_w and self.macs_per_second:
            parts["static"] = self.static_power_w / self.macs_per_second * 1e12
        return parts


def crossbar_pim(*, xbar_rows: int, xbar_cols: int, crossbars: int, adcs: int, clock_hz: float,
                 weight_bits: int, cell_bits: int, input_bits: int, dac_bits: int,
                 adc_pj: tuple[float, str], dac_pj: tuple[float, str], cell_pj: tuple[float, str],
                 shift_add_pj: tuple[float, str], static_power_w: float = 0.0,
                 calibration: dict[str, str] | None = None) -> CostModel:
    """Bit-serial crossbar PIM (ISAAC-style): weights bit-sliced over ``weight_bits / cell_bits`` cells of a
    row, inputs streamed ``dac_bits`` per cycle, one column read per ADC conversion.

    One conversion sums ``xbar_rows`` products of one input bit-slice and one weight cell, i.e.
    ``xbar_rows / (cells_per_weight * input_cycles)`` 8-bit MACs. Every ADC converts once per clock and
    all of the tier's ADCs are kept busy (weights replicated into idle crossbars, as ISAAC does), so the
    tier's throughput is ``adcs * clock * macs_per_conversion``. A row drive feeds ``xbar_cols`` cells
    (``xbar_cols / cells_per_weight`` weights); each cell is read once per input cycle.
    """
    cells_per_weight = math.ceil(weight_bits / cell_bits)
    input_cycles = math.ceil(input_bits / dac_bits)
    macs_per_conversion = xbar_rows / (cells_per_weight * input_cycles)
    terms = (
        EnergyTerm("adc", adc_pj[0], 1 / macs_per_conversion, adc_pj[1]),
        EnergyTerm("dac", dac_pj[0], input_cycles * cells_per_weight / xbar_cols, dac_pj[1]),
        EnergyTerm("cell", cell_pj[0], cells_per_weight * input_cycles, cell_pj[1]),
        EnergyTerm("shift_add", shift_add_pj[0], 1 / macs_per_conversion, shift_add_pj[1]),
    )
    notes = {
        "crossbars": str(crossbars),
        "cells_per_weight": str(cells_per_weight),
        "input_cycles": str(input_cycles),
        "macs_per_conversion": f"{macs_per_conversion:g}",
        "throughput": f"{adcs} ADCs x {clock_hz:g} Hz x {macs_per_conversion:g} MAC/conversion",
    }
    return CostModel(adcs * clock_hz * macs_per_conversion, terms, static_power_w, notes, calibration or {})


def photonic_dot_product(*, tiles: int, cores_per_tile: int, core_height: int, core_width: int, wavelengths: int,
                         clock_hz: float, accumulation_cycles: int, stationary_reuse: int,
                         dac_pj: tuple[float, str], modulator_pj: tuple[float, str], adc_pj: tuple[float, str],
                         tia_pj: tuple[float, str], photodetector_pj: tuple[float, str],
                         laser_w_per_core: tuple[float, str],
                         calibration: dict[str, str] | None = None) -> CostModel:
    """TeMPO-style dynamic photonic tensor cores, device counts by SimPhony's DPTC scaling rules.

    Each core computes ``core_height x core_width`` dot products of length ``wavelengths`` per cycle.
    Per cycle the tier drives ``H*R*N*C`` DAC+modulator pairs for the streamed operand and ``W*C*N`` for the
    stationary one, which is re-modulated only every ``stationary_reuse`` cycles (weight-stationary dataflow:
    a weight tile, or K in Q K^T, is held while that many input vectors stream through). Both operands
    are modulated, so dynamic matmuls run too. It also drives ``H*W*R*C`` photodetectors, and, once per
    ``accumulation_cycles`` (temporal accumulation), ``H*W*R*C`` TIAs and ``H*W*R`` ADCs (shared by the
    cores of a tile).
    The laser draws ``laser_w_per_core`` per core while busy (static power).
    """
    height, width, n_lambda, tiles_, cores = core_height, core_width, wavelengths, tiles, cores_per_tile
    macs_per_cycle = tiles_ * cores * height * width * n_lambda
    modulators = height * tiles_ * n_lambda * cores + width * cores * n_lambda / stationary_reuse
    terms = (
        EnergyTerm("dac", dac_pj[0], modulators / macs_per_cycle, dac_pj[1]),
        EnergyTerm("modulator", modulator_pj[0], modulators / macs_per_cycle, modulator_pj[1]),
        EnergyTerm("photodetector", photodetector_pj[0], height * width * tiles_ * cores / macs_per_cycle,
                   photodetector_pj[1]),
        EnergyTerm("tia", tia_pj[0], height * width * tiles_ * cores / accumulation_cycles / macs_per_cycle,
                   tia_pj[1]),
        EnergyTerm("adc", adc_pj[0], height * width * tiles_ / accumulation_cycles / macs_per_cycle, adc_pj[1]),
    )
    notes = {
        "macs_per_cycle": str(macs_per_cycle),
        "throughput": f"{tiles_} tiles x {cores} cores x {height}x{width} x {n_lambda} wavelengths x "
                      f"{clock_hz:g} Hz",
        "laser": laser_w_per_core[1],
    }
    return CostModel(macs_per_cycle * clock_hz, terms, laser_w_per_core[0] * tiles_ * cores, notes,
                     calibration or {})


def mac_array(*, macs_per_cycle: int, clock_hz: float, mac_pj: tuple[float, str],
              operand_read_pj: tuple[float, str], operand_reads_per_mac: float) -> CostModel:
    """A digital MAC array: ``macs_per_cycle`` MACs per clock, each costing a MAC plus operand reads."""
    terms = (
        EnergyTerm("mac", mac_pj[0], 1.0, mac_pj[1]),
        EnergyTerm("operand_read", operand_read_pj[0], operand_reads_per_mac, operand_read_pj[1]),
    )
    notes = {"throughput": f"{macs_per_cycle} MAC/cycle x {clock_hz:g} Hz"}
    return CostModel(macs_per_cycle * clock_hz, terms, 0.0, notes)
