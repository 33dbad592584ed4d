"""Photonic tensor cores (TeMPO-style, H3PIMAP Table I): fast, low-precision, runs dynamic matmuls too.

Geometry (Table I): 2 tiles x 2 cores of 14x14 dot-product units, 392 8-bit SAR ADCs (14x14 per tile,
shared by its cores), 3 GHz, 6-bit operands (Table V: 6-6-8). Both operands are modulated each cycle, so
weights are streamed from the global buffer: capacity is unbounded and dynamic matmuls run here.

Per-event energies are SimPhony's device library (ScopeX-ASU/SimPhony configs/devices) scaled to 3 GHz and
6 bits with SimPhony's formulas (../shared/research/hw_models.md §1.2). Noise: TeMPO's measured relative
Gaussian input noise, x~ = x + N(0, (0.0031 |x|)^2), on both operands (H3PIMAP §III-C).
"""

from hetcomp.targets.base import DYNAMIC, WEIGHT_STATIC, NoiseModel, Precision, Target, TileGeometry
from hetcomp.targets.cost import photonic_dot_product

CLOCK_HZ = 3e9
TILES, CORES_PER_TILE, CORE = 2, 2, 14
# Not in Table I. Fitted so that 100% photonic latency matches Table V given the other tiers' fit
# (bench/table_v.py --fit); SimPhony's default DPTC uses 12.
WAVELENGTHS = 21
STATIONARY_REUSE = 128
INPUT_BITS, WEIGHT_BITS, OUTPUT_BITS = 6, 6, 8
NOISE_SIGMA = 0.0031

COST = photonic_dot_product(
    tiles=TILES, cores_per_tile=CORES_PER_TILE, core_height=CORE, core_width=CORE, wavelengths=WAVELENGTHS,
    clock_hz=CLOCK_HZ, accumulation_cycles=3,  # SimPhony dptc.yml: temporal accumulation over 3 cycles
    # Weight-stationary dataflow (a SimPhony dataflow option): a stationary operand is held while one
    # 128-token sequence streams through. An assumption about the mapping, not a fitted number.
    stationary_reuse=STATIONARY_REUSE,
    # DAC_2 (16 nm SC-DAC, 8 b, 14 GS/s, 50 mW) scaled by 2^b/(b+1) and f: 1.15 pJ at 6 b, 3 GHz.
    dac_pj=(1.15, "SimPhony DAC_2 (50 mW @ 8 b, 14 GS/s) scaled to 6 b, 3 GHz"),
    modulator_pj=(0.45, "SimPhony/Lightening-Transformer LT_MZM, 450 fJ/bit x 3 GHz / 3 GHz"),
    adc_pj=(1.48, "SimPhony ADC_SAR_1 (14.8 mW @ 8 b, 10 GS/s) scaled to 3 GHz"),
    tia_pj=(1.0, "SimPhony TIA_1, 3 mW / 3 GHz"),
    photodetector_pj=(0.37, "SimPhony LT_PD, 1.1 mW / 3 GHz"),
    # SimPhony laser link budget: P_dBm = IL + PD sensitivity + 10 log10(H*W) ~ 2.1 dBm for a 14x14 core,
    # / wall-plug 0.2, x 2^6 levels: 0.524 W per core at 6-bit operands.
    laser_w_per_core=(0.524, "SimPhony laser formula, 14x14 core, -25 dBm PD, wall-plug 0.2, 6-bit"),
    calibration={"wavelengths": "fitted to H3PIMAP Table V 100% TeMPO latency (0.91 ms), bench/table_v.py --fit"},
)

TARGET = Target(
    name="photonic",
    description="Photonic TeMPO-style dot-product cores, 2 tiles x 2 cores of 14x14, 6-bit operands, 3 GHz",
    analog=True,
    precision=Precision(input_bits=INPUT_BITS, weight_bits=WEIGHT_BITS, output_bits=OUTPUT_BITS),
    noise=NoiseModel(kind="relative-gaussian", weight_noise_rel=NOISE_SIGMA, params={"input_noise_rel": NOISE_SIGMA}),
    tile=TileGeometry(rows=CORE, cols=CORE, crossbars_per_tile=CORES_PER_TILE, tiles=None),
    clock_hz=CLOCK_HZ,
    supports=frozenset({WEIGHT_STATIC, DYNAMIC}),
    cost=COST,
    accuracy_rank=4,
    lowering={"simulator": "photonic", "input_bits": INPUT_BITS, "weight_bits": WEIGHT_BITS,
              "output_bits": OUTPUT_BITS, "input_noise_rel": NOISE_SIGMA},
)
