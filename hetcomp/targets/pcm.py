"""Phase-change-memory analog in-memory computing, simulated by aihwkit (HILAL's configuration)."""

from hetcomp.targets.base import WEIGHT_STATIC, Precision, Target, TileGeometry
from hetcomp.targets.cost import CostModel, EnergyTerm

# Measured chip, not a component model: IBM HERMES (Le Gallo et al., Nature Electronics 2023), 64 PCM cores
# of 256x256, 14 nm: 16.1 TOPS at 2.48 TOPS/W with 8-bit inputs/outputs -> 8.05e12 MAC/s, 0.806 pJ/MAC.
COST = CostModel(
    macs_per_second=8.05e12,
    terms=(EnergyTerm("chip", 0.806, 1.0, "HERMES (Le Gallo et al., Nat. Electron. 2023): 2.48 TOPS/W at 8 bit"),),
    notes={"throughput": "HERMES: 16.1 TOPS at 8-bit I/O"},
)

TARGET = Target(
    name="pcm",
    description="PCM crossbar AIMC (aihwkit PCMLikeNoiseModel, global drift compensation)",
    analog=True,
    # 8-bit DAC/ADC as in HILAL's IOParameters (inp_res = out_res = 1/(2**8-2)); weights are analog.
    precision=Precision(input_bits=8, weight_bits=None, output_bits=8),
    # 256x256 tiles as in HILAL's mapping; as many tiles as the model needs (capacity unbounded).
    tile=TileGeometry(rows=256, cols=256, tiles=None),
    clock_hz=None,
    supports=frozenset({WEIGHT_STATIC}),
    cost=COST,
    accuracy_rank=3,
    # aihwkit's PCM model; these are the settings hetcomp.lower.aihwkit_sim.DEFAULTS documents, given here so
    # the target file shows them (training_noise_rel is HILAL's gamma, the Hessian passes' weight noise).
    simulator="aihwkit",
    device={"g_max": 25.0, "training_noise_rel": 0.08, "out_noise": 0.06, "digital_bias": True},
)
