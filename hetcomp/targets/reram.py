"""ReRAM processing-in-memory tier (H3PIMAP Table I): thermal and shot conductance noise (Eq. 1).

Geometry (Table I): 32 nm, 100 tiles x 64 crossbars of 128x128, 2-bit cells x 4 = 8-bit weights, one 8-bit
SAR ADC per crossbar (64 per tile), 100 MHz; 8-bit inputs streamed 1 bit per cycle (ISAAC).

Noise: H3PIMAP Eq. 1 as PytorX implements it (dimensionally consistent form):
sigma_G = sqrt(G * f * (4 k T + 2 q V) / V^2), drawn afresh on every read. Parameters (PytorX defaults,
Table I clock): G in [0.333 uS, 333 uS], V = 0.2 V read voltage, f = 100 MHz, T = 300 K. At G_max this is
0.26 uS, 7.8e-4 of G_max per cell.
"""

import math

from hetcomp.targets.base import WEIGHT_STATIC, NoiseModel, Precision, Target, TileGeometry
from hetcomp.targets.cost import ISAAC_DAC_1BIT_100MHZ, ISAAC_SHIFT_ADD, crossbar_pim

CLOCK_HZ = 100e6
XBAR = 128
CROSSBARS_PER_TILE = 64
ADCS_PER_TILE = 64
TILES = 100
WEIGHT_BITS, CELL_BITS, INPUT_BITS, DAC_BITS, ADC_BITS = 8, 2, 8, 1, 8

BOLTZMANN = 1.380649e-23
ELECTRON_CHARGE = 1.602176634e-19
NOISE = {"g_min_s": 0.333e-6, "g_max_s": 333e-6, "voltage_v": 0.2, "freq_hz": CLOCK_HZ, "temperature_k": 300.0}


def conductance_sigma(g: float, p: dict = NOISE) -> float:
    """Eq. 1: thermal + shot noise std (S) of a cell at conductance ``g`` (S)."""
    return math.sqrt(g * p["freq_hz"] * (4 * BOLTZMANN * p["temperature_k"] + 2 * ELECTRON_CHARGE * p["voltage_v"])
                     / p["voltage_v"] ** 2)


# Effective weight-noise std relative to max|W| (for the Hessian passes): a weight is the shift-add of
# 4 cells, digit k weighted 4^k; at full scale every cell is at G_max.
_CELL_REL = conductance_sigma(NOISE["g_max_s"]) / (NOISE["g_max_s"] - NOISE["g_min_s"])
_LEVELS = 2**CELL_BITS - 1
_SLICES = WEIGHT_BITS // CELL_BITS
WEIGHT_NOISE_REL = _CELL_REL * _LEVELS * math.sqrt(sum(16**k for k in range(_SLICES))) / (2**WEIGHT_BITS - 1)

COST = crossbar_pim(
    xbar_rows=XBAR, xbar_cols=XBAR, crossbars=CROSSBARS_PER_TILE * TILES, adcs=ADCS_PER_TILE * TILES,
    clock_hz=CLOCK_HZ, weight_bits=WEIGHT_BITS, cell_bits=CELL_BITS, input_bits=INPUT_BITS, dac_bits=DAC_BITS,
    # NeuroSim V1.4 SarADC.cpp, 32 nm LP: P = (1.1294*8 + 8.8998) uW = 17.9 uW for 9 ns.
    adc_pj=(0.161, "NeuroSim V1.4 SarADC.cpp closed form, 32 nm, 8-bit: 17.9 uW x 9 ns"),
    dac_pj=ISAAC_DAC_1BIT_100MHZ,
    # ISAAC: memristor arrays 2.4 mW for 8 arrays of 128x128 cells per 100 ns read -> 1.83 fJ per cell read.
    cell_pj=(0.00183, "ISAAC Table I memristor array, 2.4 mW x 100 ns / (8 x 128 x 128)"),
    shift_add_pj=ISAAC_SHIFT_ADD,
    # Peripheral static power (non-volatile cells leak nothing); fitted like SRAM's.
    static_power_w=0.479,
    calibration={"static_power_w": "fitted to H3PIMAP Table V 100% ReRAM energy (13.44 mJ), bench/table_v.py --fit"},
)

TARGET = Target(
    name="reram",
    description="ReRAM-PIM, 32 nm, 8-bit weights (2-bit x 4 cells), 8-bit SAR ADCs, 100 MHz",
    analog=True,
    precision=Precision(input_bits=INPUT_BITS, weight_bits=WEIGHT_BITS, output_bits=ADC_BITS),
    noise=NoiseModel(kind="reram-thermal-shot", weight_noise_rel=WEIGHT_NOISE_REL, params=dict(NOISE)),
    tile=TileGeometry(rows=XBAR, cols=XBAR, crossbars_per_tile=CROSSBARS_PER_TILE, tiles=TILES,
                      cells_per_weight=WEIGHT_BITS // CELL_BITS),
    clock_hz=CLOCK_HZ,
    supports=frozenset({WEIGHT_STATIC}),
    cost=COST,
    accuracy_rank=2,
    lowering={"simulator": "pim-crossbar", "input_bits": INPUT_BITS, "weight_bits": WEIGHT_BITS,
              "cell_bits": CELL_BITS, "dac_bits": DAC_BITS, "adc_bits": ADC_BITS, "xbar_rows": XBAR,
              "conductance_noise": dict(NOISE)},
)
