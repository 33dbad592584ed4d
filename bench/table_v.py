"""Check the tier cost models against H3PIMAP Table V (Pythia-70M on SRAM / ReRAM / TeMPO photonic).

    python bench/table_v.py          # the table with relative errors (goal: within 25% each)
    python bench/table_v.py --fit    # re-derive the calibrated constants (see below)

Pythia-70M-shaped model (GPT-NeoX: d=512, 6 layers, 8 heads, MLP 2048, vocab 50304; random weights, cost
only), 24 linear layers + 12 attention matmuls as in Table III. Attention matmuls are dynamic: in the 100%-SRAM and
100%-ReRAM rows (and the equal split) they run on the photonic tier, the only one of the three that runs them.

What this check is worth, stated: 4 free parameters are fitted to Table V's 8 numbers (latency and energy of
its 4 rows). SEQUENCES (sequences of TOKENS = 128 tokens per inference; Table V does not give the workload) makes
the SRAM and ReRAM latency errors equal and opposite; the photonic WAVELENGTHS (not in Table I) match the 100%
photonic latency; the SRAM and ReRAM static powers (Table I says only "medium" / "low") match the 100% SRAM /
ReRAM energies. So 3 numbers match by construction, and the workload leaves of the two PIM latencies only their
ratio. The equal-split row is no check either: Eq. 2 is linear in the rows, so its energy is the mean of the three
single-tier energies and its latency the ReRAM latency / 3 (the slowest tier of every weight-static layer) plus
2/3 of the attention time; Table V's own numbers obey the same identities. What is left to test the model:
the ReRAM/SRAM latency ratio (2.0 from Table I's geometry, 1.44 in the paper: hence the +-16% latency errors)
and the photonic energy, which rests on the fitted wavelength count (SimPhony's default 12 wavelengths give
+76% latency and +36% energy on the 100% photonic row). ``main`` prints this accounting, computed.
Everything else (throughputs from Table I's geometry, per-event energies, the laser power) comes from the
sources named in hetcomp/targets/*.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from hetcomp import targets
from hetcomp.graph import layer_annotations, trace
from hetcomp.partition.mapping_cost import MappingProblem
from hetcomp.targets.photonic import photonic_target
from hetcomp.zoo import pythia_70m_shaped

TOKENS = 128  # sequence length (TinyStories stories are short)
SEQUENCES = 18.0  # calibrated, see the docstring
PAPER = {  # Table V: latency ms, energy mJ
    "100% SRAM": (10.21, 13.79), "100% ReRAM": (14.73, 13.44), "100% TeMPO": (0.91, 8.92),
    "Equal Distribution": (4.90, 12.02),
}


_LAYERS: list = []


def pythia_layers():
    if not _LAYERS:
        gm = trace(pythia_70m_shaped(), (torch.zeros(1, TOKENS, dtype=torch.long),))
        _LAYERS.extend(a.layer for a in layer_annotations(gm))
    return _LAYERS


def rows_of(problem: MappingProblem) -> dict[str, np.ndarray]:
    return {"100% SRAM": problem.single_tier("sram"), "100% ReRAM": problem.single_tier("reram"),
            "100% TeMPO": problem.single_tier("photonic"), "Equal Distribution": problem.equal_split()}


def table(tiers, sequences: float) -> dict[str, tuple[float, float]]:
    problem = MappingProblem.build(pythia_layers(), tiers, samples=sequences)
    out = {}
    for name, counts in rows_of(problem).items():
        cost = problem.evaluate(counts)
        out[name] = (float(cost.latency_s[0]) * 1e3, float(cost.energy_j[0]) * 1e3)
    return out


def fit() -> None:
    sram, reram, photonic = (targets.get(n) for n in ("sram", "reram", "photonic"))
    zero = [dataclasses.replace(t, cost=dataclasses.replace(t.cost, static_power_w=0.0)) for t in (sram, reram)]
    # 1. tokens: SRAM and ReRAM latency errors equal and opposite (latency does not depend on static power).
    best = min(np.arange(1.0, 64.0, 0.5), key=lambda s: _latency_spread(table([*zero, photonic], s)))
    rows = table([*zero, photonic], best)
    print(f"SEQUENCES = {best}: SRAM {rows['100% SRAM'][0]:.2f} ms, ReRAM {rows['100% ReRAM'][0]:.2f} ms")
    # 2. wavelengths: the 100% photonic latency.
    errors = {}
    for n in range(4, 65):
        tier = photonic_target(photonic.precision.input_bits, wavelengths=n)
        errors[n] = abs(table([*zero, tier], best)["100% TeMPO"][0] / PAPER["100% TeMPO"][0] - 1)
    n_best = min(errors, key=errors.get)
    print(f"WAVELENGTHS = {n_best} (photonic latency error {errors[n_best]:.1%})")
    # 3. static powers: E = E_dynamic + P * busy time of that tier.
    photonic = photonic_target(photonic.precision.input_bits, wavelengths=n_best)
    problem = MappingProblem.build(pythia_layers(), [*zero, photonic], samples=best)
    for tier, row in ((zero[0], "100% SRAM"), (zero[1], "100% ReRAM")):
        counts = rows_of(problem)[row]
        energy_mj = float(problem.evaluate(counts).energy_j[0]) * 1e3  # without this tier's static power
        tier_index = problem.names.index(tier.name)
        share = counts[:, tier_index] / problem.rows
        busy_s = float((share * problem.macs * problem.seconds_per_mac[tier_index]).sum())
        power = (PAPER[row][1] - energy_mj) * 1e-3 / busy_s
        print(f"{tier.name} static_power_w = {power:.3f} (dynamic {energy_mj:.2f} mJ over {busy_s * 1e3:.2f} ms busy)")


def _latency_spread(rows) -> float:
    a = rows["100% SRAM"][0] / PAPER["100% SRAM"][0] - 1
    b = rows["100% ReRAM"][0] / PAPER["100% ReRAM"][0] - 1
    return max(abs(a), abs(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="re-derive the calibrated constants")
    args = parser.parse_args(argv)
    if args.fit:
        fit()
        return 0
    tiers = [targets.get(n) for n in ("sram", "reram", "photonic")]
    rows = table(tiers, SEQUENCES)
    print(f"Pythia-70M-shaped, {SEQUENCES:g} sequences x {TOKENS} tokens (calibrated workload); "
          "paper = H3PIMAP Table V")
    print(f"{'strategy':<20} {'latency ms':>10} {'paper':>7} {'error':>7}   {'energy mJ':>9} {'paper':>7} {'error':>7}")
    worst = 0.0
    for name, (latency, energy) in rows.items():
        paper_latency, paper_energy = PAPER[name]
        e_lat, e_en = latency / paper_latency - 1, energy / paper_energy - 1
        worst = max(worst, abs(e_lat), abs(e_en))
        print(f"{name:<20} {latency:>10.2f} {paper_latency:>7.2f} {e_lat:>+7.1%}   {energy:>9.2f} {paper_energy:>7.2f} "
              f"{e_en:>+7.1%}")
    print(f"largest relative error {worst:.1%} (goal: within 25%)")
    print()
    print(honesty(rows))
    return 0 if worst <= 0.25 else 1


def honesty(rows: dict[str, tuple[float, float]]) -> str:
    """What the table above tests and what it only reproduces by construction, with the numbers."""
    from hetcomp.targets import photonic as photonic_module

    sram, reram, tempo, equal = (rows[name] for name in PAPER)
    p_sram, p_reram, p_tempo, p_equal = (PAPER[name] for name in PAPER)
    tiers = [targets.get(n) for n in ("sram", "reram", "photonic")]
    geometry_ratio = tiers[0].cost.macs_per_second / tiers[1].cost.macs_per_second
    problem = MappingProblem.build(pythia_layers(), tiers, samples=SEQUENCES)
    dynamic = np.array([layer.kind != "weight-static" for layer in problem.layers])
    attention_ms = float(problem.evaluate(problem.single_tier("photonic")).layer_latency_s[0][dynamic].sum()) * 1e3
    no_static = [dataclasses.replace(t, cost=dataclasses.replace(t.cost, static_power_w=0.0)) for t in tiers[:2]]
    dynamic_only = table([*no_static, tiers[2]], SEQUENCES)
    static_share = [1 - dynamic_only[name][1] / rows[name][1] for name in ("100% SRAM", "100% ReRAM")]
    default_n = 12  # SimPhony's default DPTC
    simphony = table([tiers[0], tiers[1], photonic_target(tiers[2].precision.input_bits, wavelengths=default_n)],
                     SEQUENCES)["100% TeMPO"]
    lines = [
        "What the table tests. 4 free parameters are fitted to its 8 numbers: the workload "
        f"({SEQUENCES:g} sequences; SRAM and ReRAM",
        f"latency errors equal and opposite), the wavelength count ({photonic_module.WAVELENGTHS}; 100% TeMPO "
        "latency) and the two static powers",
        f"(SRAM {tiers[0].cost.static_power_w:.3f} W, ReRAM {tiers[1].cost.static_power_w:.3f} W; 100% SRAM and "
        "ReRAM energy).",
        f"- By construction: SRAM energy {sram[1] / p_sram[1] - 1:+.1%}, ReRAM energy "
        f"{reram[1] / p_reram[1] - 1:+.1%}, TeMPO latency {tempo[0] / p_tempo[0] - 1:+.1%}; the SRAM and ReRAM",
        "  latencies share the fitted workload, which leaves only their ratio to test. The fitted static powers "
        f"are {static_share[0]:.0%} / {static_share[1]:.0%}",
        "  of the SRAM / ReRAM energies.",
        "- The equal split follows from the single-tier rows (Eq. 2 is linear in the rows):",
        f"  energy = mean of the 3 single-tier energies = {(sram[1] + reram[1] + tempo[1]) / 3:.2f} mJ "
        f"(row {equal[1]:.2f}; from the paper's rows {(p_sram[1] + p_reram[1] + p_tempo[1]) / 3:.2f}, "
        f"its table {p_equal[1]:.2f});",
        f"  latency = ReRAM / 3 + 2/3 x attention ({attention_ms:.3f} ms) = "
        f"{reram[0] / 3 + 2 / 3 * attention_ms:.2f} ms (row {equal[0]:.2f}; paper's ReRAM / 3 = "
        f"{p_reram[0] / 3:.2f}, its table {p_equal[0]:.2f}).",
        "- Independent checks, only two:",
        f"  ReRAM/SRAM latency ratio {geometry_ratio:.2f} from Table I's geometry ({reram[0] / sram[0]:.2f} with "
        f"attention) vs {p_reram[0] / p_sram[0]:.2f} in the paper:",
        "  hence the +-16% latency errors;",
        f"  photonic energy {tempo[1] / p_tempo[1] - 1:+.1%}, resting on the fitted wavelength count: SimPhony's "
        f"default {default_n} wavelengths give",
        f"  {simphony[0] / p_tempo[0] - 1:+.0%} latency and {simphony[1] / p_tempo[1] - 1:+.0%} energy on the 100% "
        "TeMPO row.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
