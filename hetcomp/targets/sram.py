"""SRAM processing-in-memory tier (H3PIMAP Table I, ISAAC-style tiles): digital bit-serial, noise-free."""

from hetcomp.targets.base import WEIGHT_STATIC, CostModel, NoiseModel, Precision, Target, TileGeometry

TARGET = Target(
    name="sram",
    description="SRAM-PIM, 22 nm, 8-bit weights (1-bit x 8 cells), 7-bit SAR ADCs, 100 MHz",
    analog=True,
    precision=Precision(input_bits=8, weight_bits=8, output_bits=7),
    # H3PIMAP treats SRAM as robust to thermal noise: only ADC quantization.
    noise=NoiseModel(kind="adc", weight_noise_rel=0.0, params={"adc_bits": 7}),
    tile=TileGeometry(rows=128, cols=128, crossbars_per_tile=256, tiles=100, cells_per_weight=8),
    clock_hz=100e6,
    supports=frozenset({WEIGHT_STATIC}),
    cost=CostModel(placeholder=True),
    accuracy_rank=1,
)
