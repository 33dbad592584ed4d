"""SRAM processing-in-memory tier (H3PIMAP Table I, ISAAC-style bit-serial tiles): digital cells, noise-free.

Geometry (Table I): 22 nm, 100 tiles x 256 crossbars of 128x128, 1-bit cells x 8 = 8-bit weights,
one 7-bit SAR ADC per crossbar (256 per tile), 100 MHz. Inputs are 8-bit, streamed 1 bit per cycle.
Per-event energies and their sources are next to each constant; the static power is calibrated (below).
"""

from hetcomp.targets.base import WEIGHT_STATIC, NoiseModel, Precision, Target, TileGeometry
from hetcomp.targets.cost import ISAAC_DAC_1BIT_100MHZ, ISAAC_SHIFT_ADD, crossbar_pim

CLOCK_HZ = 100e6
XBAR = 128
CROSSBARS_PER_TILE = 256
ADCS_PER_TILE = 256
TILES = 100
WEIGHT_BITS, CELL_BITS, INPUT_BITS, DAC_BITS, ADC_BITS = 8, 1, 8, 1, 7

COST = crossbar_pim(
    xbar_rows=XBAR, xbar_cols=XBAR, crossbars=CROSSBARS_PER_TILE * TILES, adcs=ADCS_PER_TILE * TILES,
    clock_hz=CLOCK_HZ, weight_bits=WEIGHT_BITS, cell_bits=CELL_BITS, input_bits=INPUT_BITS, dac_bits=DAC_BITS,
    # NeuroSim V1.4 SarADC.cpp, 22 nm LP: P = (0.538*log2(L) + 4.3753) uW for (log2(L)+1) ns, L = 128 levels:
    # 8.14 uW x 8 ns = 0.065 pJ per conversion.
    adc_pj=(0.065, "NeuroSim V1.4 SarADC.cpp closed form, 22 nm, 7-bit: 8.14 uW x 8 ns"),
    dac_pj=ISAAC_DAC_1BIT_100MHZ,
    cell_pj=(0.00112, "MNSIM-2.0 SRAM read energy 1.12 fJ/bit"),
    shift_add_pj=ISAAC_SHIFT_ADD,
    # Leakage + peripheral static power of 52 MB of SRAM arrays: no public number for this design;
    # fitted to H3PIMAP Table V's 100%-SRAM energy by bench/table_v.py --fit.
    static_power_w=0.897,
    calibration={"static_power_w": "fitted to H3PIMAP Table V 100% SRAM energy (13.79 mJ), bench/table_v.py --fit"},
)

TARGET = Target(
    name="sram",
    description="SRAM-PIM, 22 nm, 8-bit weights (1-bit x 8 cells), 7-bit SAR ADCs, 100 MHz",
    analog=True,
    precision=Precision(input_bits=INPUT_BITS, weight_bits=WEIGHT_BITS, output_bits=ADC_BITS),
    # H3PIMAP §III-C treats SRAM as robust to thermal noise: only quantization (inputs, weights, ADC).
    noise=NoiseModel(kind="adc", weight_noise_rel=0.0, params={"adc_bits": ADC_BITS}),
    tile=TileGeometry(rows=XBAR, cols=XBAR, crossbars_per_tile=CROSSBARS_PER_TILE, tiles=TILES,
                      cells_per_weight=WEIGHT_BITS // CELL_BITS),
    clock_hz=CLOCK_HZ,
    supports=frozenset({WEIGHT_STATIC}),
    cost=COST,
    accuracy_rank=1,
    lowering={"simulator": "pim-crossbar", "input_bits": INPUT_BITS, "weight_bits": WEIGHT_BITS,
              "cell_bits": CELL_BITS, "dac_bits": DAC_BITS, "adc_bits": ADC_BITS, "xbar_rows": XBAR},
)
