"""Digital (CMOS) execution: exact floating-point arithmetic, runs every op kind."""

from hetcomp.targets.base import DYNAMIC, WEIGHT_STATIC, CostModel, NoiseModel, Precision, Target

TARGET = Target(
    name="digital",
    description="Digital CMOS core, FP32, noise-free",
    analog=False,
    precision=Precision(input_bits=None, weight_bits=None, output_bits=None),
    noise=NoiseModel(kind="none"),
    tile=None,
    clock_hz=1.0e9,
    supports=frozenset({WEIGHT_STATIC, DYNAMIC}),
    cost=CostModel(placeholder=True),
    accuracy_rank=0,
)
