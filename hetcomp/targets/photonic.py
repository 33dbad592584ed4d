"""Photonic tensor cores (TeMPO-style, H3PIMAP Table I): fast, low-precision, runs dynamic matmuls too.

Geometry (Table I): 2 tiles x 2 cores of 14x14 dot-product units, 392 8-bit SAR ADCs (14x14 per tile,
shared by its cores), 3 GHz, 6-bit operands (Table V: 6-6-8). Both operands are modulated each cycle, so
weights are streamed from the global buffer: capacity is unbounded and dynamic matmuls run here.

Per-event energies are SimPhony's device library (ScopeX-ASU/SimPhony configs/devices) scaled to 3 GHz and
6 bits with SimPhony's formulas (../shared/research/hw_models.md §1.2). Noise: TeMPO's measured relative
Gaussian input noise, x~ = x + N(0, (0.0031 |x|)^2), on both operands (H3PIMAP §III-C).
"""

from hetcomp.errors import TargetError
from hetcomp.targets.base import DYNAMIC, WEIGHT_STATIC, Precision, Target, TileGeometry
from hetcomp.targets.cost import photonic_dot_product

CLOCK_HZ = 3e9
TILES, CORES_PER_TILE, CORE = 2, 2, 14
# Not in Table I. Fitted so that 100% photonic latency matches Table V given the other tiers' fit
# (bench/table_v.py --fit); SimPhony's default DPTC uses 12.
WAVELENGTHS = 21
STATIONARY_REUSE = 128
INPUT_BITS, WEIGHT_BITS, OUTPUT_BITS = 6, 6, 8
NOISE_SIGMA = 0.0031



def dac_pj(bits: int) -> float:
    """SimPhony DAC scaling of DAC_2 (50 mW at 8 b, 14 GS/s): P ~ 2^b / (b + 1) x f; energy per conversion at 3 GHz."""
    power_w = 50e-3 * (2**bits / (bits + 1)) / (2**8 / 9) * (CLOCK_HZ / 14e9)
    return power_w / CLOCK_HZ * 1e12


def photonic_target(bits: int = 6, name: str | None = None, wavelengths: int = WAVELENGTHS) -> Target:
    """The photonic tier at ``bits``-bit operands (Table I: 4 to 6). DAC energy and laser power scale with the
    bits by SimPhony's formulas; everything else is as for the registered 6-bit ``photonic`` target.
    ``wavelengths``: the calibrated count by default (bench/table_v.py --fit varies it)."""
    if not 2 <= bits <= 8:
        raise TargetError(f"photonic operand bits must be in [2, 8], got {bits}")
    cost = photonic_dot_product(
        tiles=TILES, cores_per_tile=CORES_PER_TILE, core_height=CORE, core_width=CORE, wavelengths=wavelengths,
        clock_hz=CLOCK_HZ, accumulation_cycles=3,  # SimPhony dptc.yml: temporal accumulation over 3 cycles
        # Weight-stationary dataflow (a SimPhony dataflow option): a stationary operand is held while one
        # 128-token sequence streams through. An assumption about the mapping, not a fitted number.
        stationary_reuse=STATIONARY_REUSE,
        dac_pj=(dac_pj(bits), f"SimPhony DAC_2 (50 mW @ 8 b, 14 GS/s) scaled to {bits} b, 3 GHz"),
        modulator_pj=(0.45, "SimPhony/Lightening-Transformer LT_MZM, 450 fJ/bit x 3 GHz / 3 GHz"),
        adc_pj=(1.48, "SimPhony ADC_SAR_1 (14.8 mW @ 8 b, 10 GS/s) scaled to 3 GHz"),
        tia_pj=(1.0, "SimPhony TIA_1, 3 mW / 3 GHz"),
        photodetector_pj=(0.37, "SimPhony LT_PD, 1.1 mW / 3 GHz"),
        # SimPhony laser link budget: P_dBm = IL + PD sensitivity + 10 log10(H*W) ~ 2.1 dBm for a 14x14 core,
        # / wall-plug 0.2, x 2^bits levels: 0.524 W per core at 6-bit operands.
        laser_w_per_core=(0.524 * 2.0 ** (bits - 6),
                          f"SimPhony laser formula, 14x14 core, -25 dBm PD, wall-plug 0.2, {bits}-bit"),
        calibration={"wavelengths": "fitted to H3PIMAP Table V 100% TeMPO latency (0.91 ms), bench/table_v.py --fit"},
    )
    return Target(
        name=name or "photonic",
        description=f"Photonic TeMPO-style dot-product cores, 2 tiles x 2 cores of 14x14, {bits}-bit operands, 3 GHz",
        analog=True,
        precision=Precision(input_bits=bits, weight_bits=bits, output_bits=OUTPUT_BITS),
        tile=TileGeometry(rows=CORE, cols=CORE, crossbars_per_tile=CORES_PER_TILE, tiles=None),
        clock_hz=CLOCK_HZ,
        supports=frozenset({WEIGHT_STATIC, DYNAMIC}),
        cost=cost,
        accuracy_rank=4,
        simulator="photonic",
        device={"input_bits": bits, "weight_bits": bits, "output_bits": OUTPUT_BITS, "input_noise_rel": NOISE_SIGMA},
    )


TARGET = photonic_target(INPUT_BITS)
COST = TARGET.cost
