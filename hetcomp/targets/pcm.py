"""Phase-change-memory analog in-memory computing, simulated by aihwkit (HILAL's configuration)."""

from hetcomp.targets.base import WEIGHT_STATIC, CostModel, NoiseModel, Precision, Target, TileGeometry

TARGET = Target(
    name="pcm",
    description="PCM crossbar AIMC (aihwkit PCMLikeNoiseModel, global drift compensation)",
    analog=True,
    # 8-bit DAC/ADC as in HILAL's IOParameters (inp_res = out_res = 1/(2**8-2)); weights are analog.
    precision=Precision(input_bits=8, weight_bits=None, output_bits=8),
    noise=NoiseModel(
        kind="pcm",
        weight_noise_rel=0.08,  # HILAL's gamma: ADD_NORMAL training noise relative to max|W|
        params={"g_max": 25.0, "out_noise": 0.06, "t_inference_s": 86400.0},
    ),
    # 256x256 tiles as in HILAL's mapping; as many tiles as the model needs (capacity unbounded).
    tile=TileGeometry(rows=256, cols=256, tiles=None),
    clock_hz=None,
    supports=frozenset({WEIGHT_STATIC}),
    cost=CostModel(placeholder=True),
    accuracy_rank=3,
    lowering={
        "simulator": "aihwkit",
        "g_max": 25.0,
        "training_noise_rel": 0.08,
        "out_noise": 0.06,
        "digital_bias": True,
    },
)
