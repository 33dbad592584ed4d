"""Digital (CMOS) execution: exact floating-point arithmetic, runs every op kind."""

from hetcomp.targets.base import DYNAMIC, WEIGHT_STATIC, Precision, Target
from hetcomp.targets.cost import mac_array

# A 32x32 FP32 systolic array at 1 GHz: the size is an assumption (a modest digital NPU), the energies are
# Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm.
COST = mac_array(
    macs_per_cycle=1024, clock_hz=1.0e9,
    mac_pj=(4.6, "Horowitz ISSCC'14 45 nm: FP32 multiply 3.7 pJ + add 0.9 pJ"),
    # 8 KB SRAM read of 64 bits ~10 pJ -> 5 pJ per 32-bit operand; each operand is reused across the
    # array's 32 lanes, so 2/32 operand reads per MAC.
    operand_read_pj=(5.0, "Horowitz ISSCC'14 45 nm: 8 KB SRAM read, 10 pJ per 64 bits"),
    operand_reads_per_mac=2 / 32,
)

TARGET = Target(
    name="digital",
    description="Digital CMOS core, FP32, noise-free",
    analog=False,
    precision=Precision(input_bits=None, weight_bits=None, output_bits=None),
    tile=None,
    clock_hz=1.0e9,
    supports=frozenset({WEIGHT_STATIC, DYNAMIC}),
    cost=COST,
    accuracy_rank=0,
)
