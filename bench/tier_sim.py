"""PIM crossbar simulator speed: hetcomp's forward against the all-bit-serial forward (every bit-plane, cell slice
and crossbar chunk in one batched matmul per block of samples), the plain loop, and the digital matmul.

hetcomp's forward computes bit by bit only the crossbar columns whose ADC could clip or round (the rest is one
integer matmul, exactly: hetcomp/lower/tier_sim.py), so it can run below the arithmetic floor of a bit-serial
forward: (input bits x cell slices) x the digital MACs, 8 x 7 = 56 for SRAM and 8 x 4 = 32 for ReRAM, or with
both signs of inputs and weights computed apart (sign-magnitude arrays) 7 x 7 x 4 = 196 and 7 x 4 x 4 = 112.
Prints seconds and the ratios to the digital forward; the outputs of the fast and the all-bit-serial forward are
compared for the same noise draw.

Then hardware repeats (hetcomp/lower/tier_repeats.py): ``--repeats`` independent reads of the layer as ``evaluate``
runs them vectorized (``Simulator.repeated``: one call for all repeats, the input shared by the repeats as a first
analog layer sees it, or folded [R*tokens, in] as later layers do) against as many separate forwards of the lowered
module, for SRAM, ReRAM and photonic; repeat 0 is checked against the module's own forward with the same seed.

    python bench/tier_sim.py [--tokens 1024] [--shape 384x1536] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hetcomp import targets  # noqa: E402
from hetcomp.lower.tier_sim import PimCrossbarSimulator  # noqa: E402


def best(fn, trials: int = 3) -> float:
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--shape", default="384x1536")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from test_multitier import _crossbar_reference

    inputs, outputs = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    linear = nn.Linear(inputs, outputs)
    x = torch.randn(args.tokens, inputs)
    print(f"Linear {inputs}->{outputs}, {args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'tier':6s} {'digital s':>10s} {'loop s':>8s} {'bit-serial s':>12s} {'hetcomp s':>10s} "
          f"{'loop/dig':>9s} {'serial/dig':>11s} {'hetcomp/dig':>12s} {'floor':>6s} {'same output':>12s}")
    floors = {"sram": 56, "reram": 32}
    with torch.no_grad():
        digital = best(lambda: linear(x), 5)
        for tier in ("sram", "reram"):
            core = PimCrossbarSimulator().lower(linear, targets.get(tier))
            loop = best(lambda core=core: _crossbar_reference(core, x), 1)
            serial = best(lambda core=core: _all_bit_serial(core, x))
            fast = best(lambda core=core: core(x))
            torch.manual_seed(1)
            expected = _all_bit_serial(core, x)
            torch.manual_seed(1)
            same = torch.allclose(core(x), expected, rtol=1e-5, atol=1e-5)
            print(f"{tier:6s} {digital:10.4f} {loop:8.3f} {serial:12.3f} {fast:10.4f} {loop / digital:9.0f} "
                  f"{serial / digital:11.0f} {fast / digital:12.1f} {floors[tier]:6d} {str(same):>12s}")
    repeats_comparison(linear, x, args.repeats)


def repeats_comparison(linear: nn.Linear, x: torch.Tensor, repeats: int) -> None:
    """``repeats`` reads vectorized (shared and folded input) against ``repeats`` separate forwards."""
    from hetcomp.lower.tier_sim import PhotonicSimulator

    print(f"\n{repeats} hardware repeats, {x.shape[0]} tokens each: separate forwards vs one vectorized call")
    print(f"{'tier':9s} {'separate s':>11s} {'shared s':>9s} {'folded s':>9s} {'sep/shared':>11s} {'sep/folded':>11s} "
          f"{'repeat 0 = module':>18s}")
    seeds = list(range(1000, 1000 + repeats))
    folded_x = torch.cat([x.roll(r, 0) for r in range(repeats)])  # repeats see different inputs
    simulators = {"sram": PimCrossbarSimulator(), "reram": PimCrossbarSimulator(), "photonic": PhotonicSimulator()}
    with torch.no_grad():
        for tier, simulator in simulators.items():
            core = simulator.lower(linear, targets.get(tier)).eval()
            separate = best(lambda core=core: [core(x) for _ in range(repeats)], 2)
            shared = best(lambda core=core, s=simulator: s.repeated(core, 0.0, [0] * repeats, seeds)(x), 2)
            folded = best(lambda core=core, s=simulator: s.repeated(core, 0.0, [0] * repeats, seeds)(folded_x,
                                                                                                   folded=True), 2)
            out = simulator.repeated(core, 0.0, [0] * repeats, seeds)(x)
            torch.manual_seed(seeds[0])
            same = torch.equal(out[: x.shape[0]], core(x))
            print(f"{tier:9s} {separate:11.3f} {shared:9.3f} {folded:9.3f} {separate / shared:10.2f}x "
                  f"{separate / folded:10.2f}x {str(same):>18s}")


def _all_bit_serial(core: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward with every crossbar column computed bit by bit (the same noise draw as ``core(x)``)."""
    from hetcomp.lower.tier_sim import _bit_serial, _conductance_noise, _weight_cells, quantize

    s = core.settings
    xq, x_scale = quantize(x, s["input_bits"])
    w_scale, digits = _weight_cells(core.weight, s)[:2]
    noise = s.get("conductance_noise")
    cells = _conductance_noise(digits, 2 ** s["cell_bits"] - 1, noise) if noise else digits
    y = _bit_serial(xq, cells, s) * (x_scale * w_scale)
    return y if core.bias is None else y + core.bias


if __name__ == "__main__":
    main()
