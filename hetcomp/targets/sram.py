"""SRAM processing-in-memory tier (H3PIMAP Table I, ISAAC-style bit-serial tiles): digital cells, noise-free.

Geometry (Table I): 22 nm, 100 tiles x 256 crossbars of 128x128, 1-bit cells x 8 = 8-bit weights,
one 7-bit SAR ADC per crossbar (256 per tile), 100 MHz. Inputs are 8-bit, streamed 1 bit per cycle.
H3PIMAP §III-C treats SRAM as robust to thermal noise: only quantization (inputs, weights, ADC).
Per-event energies and their sources are next to each constant; the static power is calibrated (below).
"""

from hetcomp.targets.crossbar import pim_crossbar_target

TARGET = pim_crossbar_target(
    name="sram",
    description="SRAM-PIM, 22 nm, 8-bit weights (1-bit x 8 cells), 7-bit SAR ADCs, 100 MHz",
    xbar=128, crossbars_per_tile=256, adcs_per_tile=256, tiles=100, clock_hz=100e6,
    weight_bits=8, cell_bits=1, input_bits=8, dac_bits=1, adc_bits=7,
    # NeuroSim V1.4 SarADC.cpp, 22 nm LP: P = (0.538*log2(L) + 4.3753) uW for (log2(L)+1) ns, L = 128 levels:
    # 8.14 uW x 8 ns = 0.065 pJ per conversion.
    adc_pj=(0.065, "NeuroSim V1.4 SarADC.cpp closed form, 22 nm, 7-bit: 8.14 uW x 8 ns"),
    cell_pj=(0.00112, "MNSIM-2.0 SRAM read energy 1.12 fJ/bit"),
    # Leakage + peripheral static power of 52 MB of SRAM arrays: no public number for this design;
    # fitted to H3PIMAP Table V's 100%-SRAM energy by bench/table_v.py --fit.
    static_power_w=0.897,
    calibration={"static_power_w": "fitted to H3PIMAP Table V 100% SRAM energy (13.79 mJ), bench/table_v.py --fit"},
    accuracy_rank=1,
)
COST = TARGET.cost
