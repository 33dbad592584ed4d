"""ReRAM processing-in-memory tier (H3PIMAP Table I): thermal and shot conductance noise (Eq. 1).

Geometry (Table I): 32 nm, 100 tiles x 64 crossbars of 128x128, 2-bit cells x 4 = 8-bit weights, one 8-bit
SAR ADC per crossbar (64 per tile), 100 MHz; 8-bit inputs streamed 1 bit per cycle (ISAAC).

Noise: H3PIMAP Eq. 1 (computed by the pim-crossbar simulator, hetcomp.lower.tier_sim.conductance_sigma),
drawn afresh on every read, with PytorX's default parameters and Table I's clock: G in [0.333 uS, 333 uS],
V = 0.2 V read voltage, f = 100 MHz, T = 300 K. At G_max this is 0.26 uS, 7.8e-4 of G_max per cell.
"""

from hetcomp.targets.crossbar import pim_crossbar_target

CLOCK_HZ = 100e6
NOISE = {"g_min_s": 0.333e-6, "g_max_s": 333e-6, "voltage_v": 0.2, "freq_hz": CLOCK_HZ, "temperature_k": 300.0}

TARGET = pim_crossbar_target(
    name="reram",
    description="ReRAM-PIM, 32 nm, 8-bit weights (2-bit x 4 cells), 8-bit SAR ADCs, 100 MHz",
    xbar=128, crossbars_per_tile=64, adcs_per_tile=64, tiles=100, clock_hz=CLOCK_HZ,
    weight_bits=8, cell_bits=2, input_bits=8, dac_bits=1, adc_bits=8,
    # NeuroSim V1.4 SarADC.cpp, 32 nm LP: P = (1.1294*8 + 8.8998) uW = 17.9 uW for 9 ns.
    adc_pj=(0.161, "NeuroSim V1.4 SarADC.cpp closed form, 32 nm, 8-bit: 17.9 uW x 9 ns"),
    # ISAAC: memristor arrays 2.4 mW for 8 arrays of 128x128 cells per 100 ns read -> 1.83 fJ per cell read.
    cell_pj=(0.00183, "ISAAC Table I memristor array, 2.4 mW x 100 ns / (8 x 128 x 128)"),
    # Peripheral static power (non-volatile cells leak nothing); fitted like SRAM's.
    static_power_w=0.479,
    calibration={"static_power_w": "fitted to H3PIMAP Table V 100% ReRAM energy (13.44 mJ), bench/table_v.py --fit"},
    accuracy_rank=2,
    conductance_noise=NOISE,
)
COST = TARGET.cost
