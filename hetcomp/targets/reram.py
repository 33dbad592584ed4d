"""ReRAM processing-in-memory tier (H3PIMAP Table I): thermal and shot conductance noise (Eq. 1)."""

from hetcomp.targets.base import WEIGHT_STATIC, CostModel, NoiseModel, Precision, Target, TileGeometry

TARGET = Target(
    name="reram",
    description="ReRAM-PIM, 32 nm, 8-bit weights (2-bit x 4 cells), 8-bit SAR ADCs, 100 MHz",
    analog=True,
    precision=Precision(input_bits=8, weight_bits=8, output_bits=8),
    noise=NoiseModel(
        kind="reram-thermal-shot",
        # Placeholder effective relative std until the multi-tier work derives it from Eq. 1.
        weight_noise_rel=0.02,
        params={"temperature_k": 300.0, "voltage_v": 0.2, "freq_hz": 100e6, "placeholder": True},
    ),
    tile=TileGeometry(rows=128, cols=128, crossbars_per_tile=64, tiles=100, cells_per_weight=4),
    clock_hz=100e6,
    supports=frozenset({WEIGHT_STATIC}),
    cost=CostModel(placeholder=True),
    accuracy_rank=2,
)
