"""Photonic tensor cores (TeMPO-style, H3PIMAP Table I): fast, low-precision, runs dynamic matmuls."""

from hetcomp.targets.base import DYNAMIC, WEIGHT_STATIC, CostModel, NoiseModel, Precision, Target, TileGeometry

TARGET = Target(
    name="photonic",
    description="Photonic TeMPO-style dot-product cores, 2 tiles x 2 cores of 14x14, 4-6-bit, 3 GHz",
    analog=True,
    precision=Precision(input_bits=6, weight_bits=6, output_bits=8),
    # TeMPO's measured relative Gaussian input noise (sigma = 0.0031), H3PIMAP §III-A.
    noise=NoiseModel(kind="relative-gaussian", weight_noise_rel=0.0031, params={"input_noise_rel": 0.0031}),
    # Operands are streamed (not stored), so capacity is unbounded.
    tile=TileGeometry(rows=14, cols=14, crossbars_per_tile=2, tiles=None),
    clock_hz=3e9,
    supports=frozenset({WEIGHT_STATIC, DYNAMIC}),
    cost=CostModel(placeholder=True),
    accuracy_rank=4,
)
