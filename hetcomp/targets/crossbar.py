"""``pim_crossbar_target``: an ISAAC-style bit-serial, bit-sliced crossbar PIM tier from its geometry, cell and
converter numbers (H3PIMAP Table I), as data: the cost model (``crossbar_pim``) and the ``pim-crossbar``
simulator's parameters come from the same numbers, so they cannot disagree. SRAM and ReRAM are two calls.
"""

from __future__ import annotations

from typing import Any

from hetcomp.graph.layers import WEIGHT_STATIC
from hetcomp.targets.base import Precision, Target, TileGeometry
from hetcomp.targets.cost import ISAAC_DAC_1BIT_100MHZ, ISAAC_SHIFT_ADD, crossbar_pim


def pim_crossbar_target(*, name: str, description: str, xbar: int, crossbars_per_tile: int, adcs_per_tile: int,
                        tiles: int, clock_hz: float, weight_bits: int, cell_bits: int, input_bits: int, dac_bits: int,
                        adc_bits: int, adc_pj: tuple[float, str], cell_pj: tuple[float, str], static_power_w: float,
                        accuracy_rank: int, conductance_noise: dict[str, float] | None = None,
                        dac_pj: tuple[float, str] = ISAAC_DAC_1BIT_100MHZ,
                        shift_add_pj: tuple[float, str] = ISAAC_SHIFT_ADD,
                        calibration: dict[str, str] | None = None) -> Target:
    """A crossbar PIM tier: ``tiles`` x ``crossbars_per_tile`` arrays of ``xbar`` x ``xbar`` cells of ``cell_bits``,
    ``weight_bits`` weights bit-sliced over cells, ``input_bits`` inputs streamed ``dac_bits`` per cycle, one
    ``adc_bits`` ADC per crossbar. ``conductance_noise``: H3PIMAP Eq. 1's parameters (g_min_s, g_max_s, voltage_v,
    freq_hz, temperature_k) for a device with read noise (ReRAM); None for noise-free cells (SRAM)."""
    cost = crossbar_pim(
        xbar_rows=xbar, xbar_cols=xbar, crossbars=crossbars_per_tile * tiles, adcs=adcs_per_tile * tiles,
        clock_hz=clock_hz, weight_bits=weight_bits, cell_bits=cell_bits, input_bits=input_bits, dac_bits=dac_bits,
        adc_pj=adc_pj, dac_pj=dac_pj, cell_pj=cell_pj, shift_add_pj=shift_add_pj, static_power_w=static_power_w,
        calibration=calibration)
    device: dict[str, Any] = {"input_bits": input_bits, "weight_bits": weight_bits, "cell_bits": cell_bits,
                              "dac_bits": dac_bits, "adc_bits": adc_bits, "xbar_rows": xbar}
    if conductance_noise:
        device["conductance_noise"] = dict(conductance_noise)
    return Target(
        name=name, description=description, analog=True,
        precision=Precision(input_bits=input_bits, weight_bits=weight_bits, output_bits=adc_bits),
        tile=TileGeometry(rows=xbar, cols=xbar, crossbars_per_tile=crossbars_per_tile, tiles=tiles,
                          cells_per_weight=weight_bits // cell_bits),
        clock_hz=clock_hz, supports=frozenset({WEIGHT_STATIC}), cost=cost, accuracy_rank=accuracy_rank,
        simulator="pim-crossbar", device=device,
    )
