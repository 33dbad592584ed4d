"""Multi-tier mapping: tier simulators, row-split lowering, NSGA-II search, row remap, strategies."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp import targets
from hetcomp.errors import ConfigError
from hetcomp.graph import mappable_nodes, trace
from hetcomp.lower import lower_graph, tier_sim
from hetcomp.lower.tier_sim import PimCrossbarSimulator
from hetcomp.partition.mapping_cost import MappingProblem
from hetcomp.partition.nsga import run_nsga2
from hetcomp.partition.rows import apply_counts
from hetcomp.targets.base import Precision, Target, TileGeometry
from hetcomp.targets.cost import CostModel, EnergyTerm
from hetcomp.zoo import DigitsTransformer

PIM = PimCrossbarSimulator()

TIERS = "sram+reram+photonic"


def _split_everything(gm, target_set):
    tiers = list(target_set)
    for _, annotation in mappable_nodes(gm):
        rows = annotation.layer.rows
        allowed = [t for t in tiers if t.supports_kind(annotation.layer.kind)]
        counts = [rows // len(allowed) if t in allowed else 0 for t in tiers]
        counts[tiers.index(allowed[-1])] += rows - sum(counts)
        apply_counts(annotation, counts, tiers, "test")


def test_pim_crossbar_with_lossless_adc_is_exact_int8_arithmetic():
    torch.manual_seed(0)
    linear = nn.Linear(300, 20)  # 300 inputs: 3 crossbars of 128 rows, the last one partly used
    x = torch.randn(16, 300)
    wide_adc = dataclasses.replace(targets.get("sram"), device={**targets.get("sram").device, "adc_bits": 16})
    core = PIM.lower(linear, wide_adc)
    xq, x_scale = tier_sim.quantize(x, 8)
    wq, w_scale = tier_sim.quantize(linear.weight.detach(), 8)
    expected = (xq @ wq.T) * x_scale * w_scale + linear.bias.detach()
    with torch.no_grad():
        assert torch.allclose(core(x), expected, atol=1e-4)
        # the real 7-bit ADC saturates full columns: close to, but not exactly, int8 arithmetic
        real = PIM.lower(linear, targets.get("sram"))(x)
    assert 0 < float((real - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_reram_conductance_noise_equals_eq1_worked_by_hand():
    """H3PIMAP Eq. 1, thermal N(0, sqrt(4 G f k_B T / V)) and shot N(0, sqrt(2 G f q / V)), evaluated by hand.

    The code uses PytorX's form sqrt(G f (4 k_B T + 2 q V)) / V (a current noise turned into a conductance
    noise: dimensionally consistent). Its shot term is Eq. 1's as printed; its thermal term is Eq. 1's / sqrt(V),
    so the two agree at V = 1 V and with T = 0, and at the ReRAM tier's V = 0.2 V the code's sigma is 9% above the
    printed formula's (2.59e-7 S against 2.37e-7 S). Numbers (k_B = 1.380649e-23, q = 1.602176634e-19, G = 333 uS,
    f = 100 MHz, T = 300 K): 4 k_B T = 1.65678e-20 J, 2 q (0.2 V) = 6.40871e-20 J, G f = 3.33e4 S/s.
    """
    reram = targets.get("reram").device["conductance_noise"]
    assert reram == {"g_min_s": 0.333e-6, "g_max_s": 333e-6, "voltage_v": 0.2, "freq_hz": 100e6,
                     "temperature_k": 300.0}
    # tier settings: sqrt(3.33e4 x (1.65678e-20 + 6.40871e-20)) / 0.2 = sqrt(2.68580e-15) / 0.2
    assert tier_sim.conductance_sigma(333e-6, reram) == pytest.approx(2.59124e-7, rel=1e-5)
    assert tier_sim.conductance_sigma(333e-6, reram) / 333e-6 == pytest.approx(7.78e-4, rel=1e-3)  # reram.py's claim
    # T = 0: shot noise alone, Eq. 1 as printed: sqrt(2 x 3.33e4 x 1.60218e-19 / 0.2) = sqrt(5.33525e-14)
    assert tier_sim.conductance_sigma(333e-6, {**reram, "temperature_k": 0.0}) == pytest.approx(2.30982e-7, rel=1e-5)
    # V = 1 V: both terms as printed, in quadrature: sqrt(3.33e4 x (1.65678e-20 + 3.20435e-19)) = sqrt(1.12222e-14)
    assert tier_sim.conductance_sigma(333e-6, {**reram, "voltage_v": 1.0}) == pytest.approx(1.05935e-7, rel=1e-5)
    # sigma grows as sqrt(G): at G_min = 0.333 uS it is 2.59124e-7 x sqrt(1e-3)
    assert tier_sim.conductance_sigma(0.333e-6, reram) == pytest.approx(8.19422e-9, rel=1e-5)


def test_reram_cell_noise_is_drawn_per_cell_in_adc_units():
    """Monte Carlo of the simulator's cell noise: 2-bit cells (levels 0..3) map G_min..G_max; the noise in digit
    units is sigma(G) / (G_max - G_min) x 3 with the hand values above (2.3368e-3 at G_max, 7.3896e-5 at G_min),
    zero-mean, independent from cell to cell and from read to read."""
    settings = targets.get("reram").device["conductance_noise"]
    cells = torch.cat([torch.full((100_000,), 3.0), torch.zeros(100_000)])
    torch.manual_seed(0)
    first = tier_sim._conductance_noise(cells, 3, settings)
    second = tier_sim._conductance_noise(cells, 3, settings)
    top, bottom = first[:100_000] - 3.0, first[100_000:]
    assert float(top.std()) == pytest.approx(2.59124e-7 / (333e-6 - 0.333e-6) * 3, rel=0.02)
    assert float(bottom.std()) == pytest.approx(8.19422e-9 / (333e-6 - 0.333e-6) * 3, rel=0.02)
    assert abs(float(top.mean())) < 4 * 2.3368e-3 / math.sqrt(100_000)
    assert abs(float(np.corrcoef(top[:-1].numpy(), top[1:].numpy())[0, 1])) < 0.02  # cell to cell
    assert abs(float(np.corrcoef(top.numpy(), (second[:100_000] - 3.0).numpy())[0, 1])) < 0.02  # read to read


def test_photonic_core_perturbs_both_operands_relatively_once_per_read():
    """The photonic simulator's noise (TeMPO, H3PIMAP §III-C: x~ = x + N(0, (sigma |x|)^2) on both operands), seen
    through a lowered layer: y = sum_i x_i (1 + sigma a_i) w_i (1 + sigma c_i), with x = w = 1 on n = 16 inputs.
    The input noise a is fresh per sample, the weight noise c once per forward (one read of the streamed weights),
    so across the samples of one forward Var y = n sigma^2 and across forwards the batch mean varies by
    n sigma^2 (1 + 1/B); quantization off (bits None) so only the noise acts. Zero inputs give exactly zero."""
    n, sigma, batch, reads = 16, 0.05, 100, 1200
    tier = dataclasses.replace(targets.get("photonic"), name="photonic-float", precision=Precision(None, None, None),
                               device={"input_bits": None, "weight_bits": None, "output_bits": None,
                                       "input_noise_rel": sigma})
    linear = nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    core = tier_sim.PhotonicSimulator().lower(linear, tier)
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = torch.stack([core(torch.ones(batch, n)).squeeze(-1) for _ in range(reads)]).double()
        assert float(core(torch.zeros(4, n)).abs().max()) == 0.0
        scaled = torch.stack([core(3 * torch.ones(batch, n)).squeeze(-1) for _ in range(reads)]).double()
    within = float(outputs.var(dim=1).mean())
    between = float(outputs.mean(dim=1).var())
    assert float(outputs.mean()) == pytest.approx(n, abs=4 * math.sqrt(n * sigma**2 * 2 / (batch * reads)) + 0.01)
    assert within == pytest.approx(n * sigma**2, rel=0.05)
    assert between == pytest.approx(n * sigma**2 * (1 + 1 / batch), rel=0.2)  # 1200 forwards: 4% std error
    assert float((scaled / 3).var(dim=1).mean()) == pytest.approx(n * sigma**2, rel=0.05)  # relative to |x|


def test_row_split_lowering_equals_original_with_noise_off():
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    x = torch.randn(6, 1, 8, 8)
    gm = trace(model, (x,))
    target_set = targets.parse(TIERS)
    _split_everything(gm, target_set)
    lowered, report = lower_graph(gm, target_set)
    assert report["blocks.0.fc1"]["simulator"] == "row-split"
    assert report["matmul"]["simulator"] == "photonic"  # dynamic: photonic only, replaced at its graph node
    with torch.no_grad():
        reference = model(x)
        with tier_sim.ideal():
            assert torch.allclose(lowered(x), reference, atol=1e-5)
        noisy = lowered(x)
    assert not torch.allclose(noisy, reference, atol=1e-5)  # the simulators are really in the path
    # a dynamic product split over photonic and digital columns is also exact when ideal
    mixed = targets.parse("photonic+digital")
    _split_everything(gm, mixed)
    lowered, report = lower_graph(gm, mixed)
    assert report["matmul"]["simulator"] == "row-split"
    with torch.no_grad(), tier_sim.ideal():
        assert torch.allclose(lowered(x), reference, atol=1e-5)


def test_rows_go_to_tiers_by_sensitivity():
    gm = trace(nn.Sequential(nn.Linear(4, 6)), (torch.zeros(2, 4),))
    (_, annotation), = mappable_nodes(gm)
    annotation.metrics["row_sensitivity"] = [0.1, 5.0, 0.2, 3.0, 0.0, 1.0]
    tiers = list(targets.parse(TIERS))  # sram (most accurate), reram, photonic
    apply_counts(annotation, [2, 1, 3], tiers, "test")
    assert annotation.assignment == {"sram": 2, "reram": 1, "photonic": 3}
    assert annotation.row_targets == ["photonic", "sram", "photonic", "sram", "photonic", "reram"]


def _pythia_like_problem(samples=1.0, tiers=TIERS):
    layers = []
    for index in range(4):
        from hetcomp.graph.layers import LayerInfo
        layers.append(LayerInfo(f"fc{index}", "weight-static", "linear", (256, 128), 256, 256 * 128,
                                256 * 128 * 64, f"fc{index}"))
    layers.append(LayerInfo("attn", "dynamic", "matmul", (1, 64, 64), 64, 0, 64 * 64 * 64, "attn"))
    return MappingProblem.build(layers, targets.parse(tiers), samples=samples)


def test_nsga2_front_is_seeded_feasible_and_beats_baselines():
    problem = _pythia_like_problem()
    first = run_nsga2(problem, population=24, generations=15, seed=3)
    again = run_nsga2(problem, population=24, generations=15, seed=3)
    assert np.array_equal(first.counts, again.counts)
    assert (first.counts.sum(axis=2) == problem.rows).all()
    assert (first.counts[:, -1, :2] == 0).all()  # the dynamic product never lands on SRAM/ReRAM
    assert (np.diff(first.latency_s) >= 0).all()
    # non-dominated within itself
    for i in range(len(first.latency_s)):
        dominated = (first.latency_s <= first.latency_s[i]) & (first.energy_j <= first.energy_j[i]) & (
            (first.latency_s < first.latency_s[i]) | (first.energy_j < first.energy_j[i]))
        assert not dominated.any()
    # no baseline dominates any front point (they seed the first population)
    for counts in [problem.single_tier(n) for n in problem.names] + [problem.equal_split()]:
        cost = problem.evaluate(counts)
        assert not ((cost.latency_s[0] < first.latency_s) & (cost.energy_j[0] < first.energy_j)).any()
    assert first.hypervolume[-1] >= first.hypervolume[0] > 0
    # hand-known extremes: photonic is the cheapest tier per MAC (static power included), so all-photonic is the
    # least-energy mapping and must be the front's last point; no mapping is faster than every layer split over
    # all tiers that run it in exact proportion to their throughputs
    assert np.array_equal(first.counts[-1], problem.single_tier("photonic"))
    rates = np.array([t.cost.macs_per_second for t in problem.tiers])
    bound = sum(macs / rates[allowed].sum() for macs, allowed in zip(problem.macs, problem.allowed))
    assert (first.latency_s >= bound * (1 - 1e-12)).all()


def _cost_tier(name: str, macs_per_s: float, pj: float, static_w: float = 0.0, rank: int = 0,
               tiles: int | None = None) -> Target:
    return Target(name=name, description="test tier", analog=True, precision=Precision(8, 8, 8),
                  tile=TileGeometry(8, 8, tiles=tiles), clock_hz=1e9, supports=frozenset({"weight-static"}),
                  cost=CostModel(macs_per_s, (EnergyTerm("mac", pj, 1.0, "test"),), static_w), accuracy_rank=rank)


def test_nsga2_finds_exactly_the_brute_force_front_of_a_small_problem():
    """Two layers (4 and 3 rows) on three tiers: all 15 x 10 = 150 mappings enumerated, their latency and energy
    computed here by hand from Eq. 2 (per layer the slowest tier's share of its MACs; energy per MAC plus static
    power x busy time), the non-dominated ones (16) found by brute force. NSGA-II must return exactly them."""
    rate, pj, static = [4e9, 1e9, 2e9], [3.0, 1.0, 1.2], [0.0, 0.0, 5e-4]
    tiers = [_cost_tier(n, r, e, w) for n, r, e, w in zip(("fast", "slow", "mid"), rate, pj, static)]
    rows, macs = [4, 3], [4e6, 9e6]
    from hetcomp.graph.layers import LayerInfo
    layers = [LayerInfo(f"l{i}", "weight-static", "linear", (r, 8), r, r * 8, m, f"l{i}")
              for i, (r, m) in enumerate(zip(rows, macs))]
    problem = MappingProblem.build(layers, tiers)

    def splits(total):
        return [(a, b, total - a - b) for a in range(total + 1) for b in range(total + 1 - a)]

    objectives = {}
    for first in splits(4):
        for second in splits(3):
            latency = energy = 0.0
            for counts, total, work in ((first, 4, 4e6), (second, 3, 9e6)):
                busy = [c / total * work / r for c, r in zip(counts, rate)]
                latency += max(busy)
                energy += sum(c / total * work * e * 1e-12 for c, e in zip(counts, pj)) + sum(
                    w * b for w, b in zip(static, busy))
            objectives[(first, second)] = (latency, energy)
    values = np.array(list(objectives.values()))
    front = {key for key, (lat, en) in objectives.items() if not (
        (values[:, 0] <= lat) & (values[:, 1] <= en) & ((values[:, 0] < lat) | (values[:, 1] < en))).any()}
    assert len(objectives) == 150 and len(front) == 16
    assert ((0, 4, 0), (0, 3, 0)) in front  # all on the cheapest tier
    result = run_nsga2(problem, population=24, generations=40, seed=0)
    found = {tuple(tuple(int(c) for c in layer) for layer in point) for point in result.counts}
    assert found == front
    for point, latency, energy in zip(result.counts, result.latency_s, result.energy_j):
        key = tuple(tuple(int(c) for c in layer) for layer in point)
        assert (latency, energy) == pytest.approx(objectives[key], rel=1e-12)


def test_row_remap_moves_the_most_sensitive_rows_first_across_layers():
    """Algorithm 2's move, on sensitivities set by hand: off the least accurate tier holding rows, the ``step``
    most sensitive of its rows, compared across layers, to the most accurate tier with room."""
    from hetcomp.graph.layers import LayerInfo
    from hetcomp.passes.row_remap import _plan_move

    exact, middle, noisy = _cost_tier("exact", 1e9, 1.0, rank=0), _cost_tier("middle", 1e9, 1.0, rank=5), \
        _cost_tier("noisy", 1e9, 1.0, rank=9)
    layers = [LayerInfo(n, "weight-static", "linear", (4, 8), 4, 32, 1000, n) for n in ("a", "b")]
    problem = MappingProblem.build(layers, [noisy, exact, middle])  # tiers in any order
    # each layer's rows ranked most sensitive first (as _row_sensitivities gives them)
    sensitivity = [np.array([9.0, 1.0, 1.0, 1.0]), np.array([5.0, 4.0, 0.1, 0.1])]
    everything_noisy = np.array([[4, 0, 0], [4, 0, 0]])
    counts, moved = _plan_move(problem, everything_noisy, sensitivity, [True, True], 3)
    assert moved == {"a: noisy->exact": 1, "b: noisy->exact": 2}  # 9, 5, 4: not a's 1s, not b's 0.1s
    assert counts.tolist() == [[3, 1, 0], [2, 2, 0]]
    counts, moved = _plan_move(problem, counts, sensitivity, [True, True], 2)
    assert moved == {"a: noisy->exact": 2} and counts.tolist() == [[1, 3, 0], [2, 2, 0]]
    assert _plan_move(problem, counts, sensitivity, [False, True], 2)[1] == {"b: noisy->exact": 2}  # a is pinned
    # the least accurate tier sheds first: b's rows on noisy move before a's (more sensitive) rows on middle
    mixed = np.array([[0, 0, 4], [2, 0, 2]])  # a: 4 on middle; b: its 2 least sensitive rows (0.1s) on noisy
    assert _plan_move(problem, mixed, sensitivity, [True, True], 2)[1] == {"b: noisy->exact": 2}
    # the most accurate tier that has room: exact holds one row (8 weights) only, the next goes to middle
    small = _cost_tier("exact", 1e9, 1.0, rank=0, tiles=None)
    small = dataclasses.replace(small, tile=TileGeometry(8, 1, crossbars_per_tile=1, tiles=1, cells_per_weight=1))
    tight = MappingProblem.build(layers, [noisy, small, middle])
    assert tight.capacity[1] == 8
    moved = _plan_move(tight, everything_noisy, sensitivity, [True, True], 2)[1]
    assert moved == {"a: noisy->exact": 1, "b: noisy->middle": 1}


def test_nsga2_respects_capacity():
    tiny_sram = dataclasses.replace(targets.get("sram"), name="tinysram",
                                    tile=TileGeometry(128, 128, crossbars_per_tile=2, tiles=1, cells_per_weight=8))
    targets.register(tiny_sram)
    try:
        problem = _pythia_like_problem(tiers="tinysram+photonic")
        result = run_nsga2(problem, population=16, generations=10, seed=0)
        capacity = tiny_sram.capacity_weights
        assert (problem.evaluate(result.counts).usage[:, 0] <= capacity).all()
        no_room = dataclasses.replace(tiny_sram, name="tinysram2", supports=frozenset({"weight-static", "dynamic"}))
        targets.register(no_room)
        with pytest.raises(ConfigError, match="does not fit"):
            run_nsga2(_pythia_like_problem(tiers="tinysram2"), population=8, generations=2)
    finally:
        targets.registry.TARGETS.unregister("tinysram")
        targets.registry.TARGETS.unregister("tinysram2")


class _Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _noisy_tier(name: str, sigma: float, rank: int, tiles: int | None = None) -> Target:
    return Target(name=name, description="test tier with large relative input noise", analog=True,
                  precision=Precision(None, None, None), tile=TileGeometry(8, 8, tiles=tiles), clock_hz=1e9,
                  supports=frozenset({"weight-static", "dynamic"}),
                  cost=CostModel(1e13, (EnergyTerm("mac", 0.01, 1.0, "test"),)), accuracy_rank=rank,
                  simulator="photonic", device={"input_bits": None, "weight_bits": None, "output_bits": None,
                            "input_noise_rel": sigma})


@pytest.fixture
def teacher_task():
    torch.manual_seed(0)
    model = _Teacher().eval()
    x = torch.randn(512, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)
    noisy = _noisy_tier("noisytier", 1.5, rank=9)
    small = _noisy_tier("exacttier", 0.0, rank=0, tiles=2)  # holds 2 x 8 x 8 = 128 weights
    for target in (noisy, small):
        targets.register(target, overwrite=True)
    yield model, (x, y)
    for name in ("noisytier", "exacttier"):
        targets.registry.TARGETS.unregister(name)


def test_row_remap_moves_rows_until_accuracy_is_back(teacher_task):
    model, data = teacher_task
    strategy = hetcomp.strategies.pareto(population=12, generations=5, tolerance=0.02, step=4, repeats=2)
    compiled = hetcomp.compile(model, "digital+noisytier", data=data, strategy=strategy)
    remap = compiled.manifest.extra["row_remap"]
    assert remap["baseline_accuracy"] == 1.0  # the labels are the model's own predictions
    trajectory = remap["trajectory"]
    assert trajectory[0]["accuracy"] < 1.0 - 0.02  # the cheap stage-1 points are too noisy
    assert remap["met"] and trajectory[-1]["accuracy"] >= 1.0 - 0.02
    for step in trajectory[1:]:
        assert step["moved"] and all("noisytier->digital" in move for move in step["moved"])
        assert sum(step["moved"].values()) <= 4
    # moving rows to the slower digital tier costs latency, step after step
    assert trajectory[-1]["latency_s"] > trajectory[0]["latency_s"]
    # every step moved the most sensitive rows still on the noisy tier, compared across layers (Eq. 4): replay the
    # trajectory on the row sensitivities (a layer's rows sit on tiers in sensitivity order, so its noisy rows are
    # its least sensitive ones); a random or per-layer choice of rows fails this
    ranked = {a.layer.name: np.sort(np.asarray(a.metrics["row_sensitivity"]))[::-1]
              for _, a in mappable_nodes(compiled.graph)}
    final_noisy = {layer["name"]: (layer["assignment"].get("noisytier", 0) if isinstance(layer["assignment"], dict)
                                   else layer["rows"] * (layer["assignment"] == "noisytier"))
                   for layer in compiled.manifest.layers}
    moved_total = {name: sum(step["moved"].get(f"{name}: noisytier->digital", 0) for step in trajectory[1:])
                   for name in ranked}
    on_digital = {name: len(ranked[name]) - final_noisy[name] - moved_total[name] for name in ranked}
    for step in trajectory[1:]:
        moved_values = []
        for name in ranked:
            count = step["moved"].get(f"{name}: noisytier->digital", 0)
            moved_values.extend(ranked[name][on_digital[name]:on_digital[name] + count])
            on_digital[name] += count
        remaining = np.concatenate([ranked[name][on_digital[name]:] for name in ranked])
        assert not len(remaining) or min(moved_values) >= remaining.max()
    assert sum(moved_total.values()) >= 8
    # the final manifest is the remapped one
    digital_rows = sum(layer["assignment"].get("digital", 0) if isinstance(layer["assignment"], dict)
                       else layer["rows"] * (layer["assignment"] == "digital") for layer in compiled.manifest.layers)
    assert digital_rows > 0


def test_row_remap_stops_when_the_accurate_tier_is_full(teacher_task):
    model, data = teacher_task
    strategy = hetcomp.strategies.pareto(population=12, generations=5, tolerance=0.0, step=4, repeats=1)
    compiled = hetcomp.compile(model, "exacttier+noisytier", data=data, strategy=strategy)
    remap = compiled.manifest.extra["row_remap"]
    assert not remap["met"]
    assert remap["stopped"] == "no row can move to a more accurate tier"
    weights_on_exact = 0
    for layer in compiled.manifest.layers:
        assignment = layer["assignment"]
        rows = assignment.get("exacttier", 0) if isinstance(assignment, dict) else layer["rows"] * (
            assignment == "exacttier")
        weights_on_exact += rows * layer["params"] // layer["rows"]
    assert weights_on_exact <= 128


def test_row_remap_orders_tiers_by_measured_quality_not_accuracy_rank(teacher_task):
    """A tier that claims to be the most accurate (accuracy_rank 0) but computes with 150% input noise, beside an
    exact tier ranked last: row remap measures each tier alone, finds the order reversed, and moves rows to the
    exact tier. Trusting accuracy_rank instead moves rows the wrong way and never meets the tolerance."""
    model, data = teacher_task
    claims = dataclasses.replace(_noisy_tier("claimsbest", 1.5, rank=0), name="claimsbest")
    honest = dataclasses.replace(_noisy_tier("ranklast", 0.0, rank=9), name="ranklast")
    for target in (claims, honest):
        targets.register(target, overwrite=True)
    try:
        def run(order):
            strategy = hetcomp.strategies.pareto(population=12, generations=5, tolerance=0.02, step=8, repeats=2,
                                                 max_steps=12, tier_order=order)
            return hetcomp.compile(model, "claimsbest+ranklast", data=data, strategy=strategy).manifest.extra[
                "row_remap"]

        measured = run("measured")
        assert measured["accuracy_rank_order"] == ["claimsbest", "ranklast"]
        assert measured["tier_order"] == ["ranklast", "claimsbest"]
        quality = measured["tier_quality"]
        assert quality["ranklast"] == 1.0 and quality["claimsbest"] < 0.9  # each tier alone, measured
        assert measured["met"] and len(measured["trajectory"]) > 1
        assert all(key.endswith("claimsbest->ranklast") for step in measured["trajectory"][1:] for key in step["moved"])
        by_rank = run("rank")
        assert by_rank["tier_quality"] is None and by_rank["tier_order"] == ["claimsbest", "ranklast"]
        assert not by_rank["met"]
        assert all(key.endswith("ranklast->claimsbest") for step in by_rank["trajectory"][1:] for key in step["moved"])
    finally:
        for name in ("claimsbest", "ranklast"):
            targets.registry.TARGETS.unregister(name)


def test_pareto_is_the_default_for_several_analog_tiers_and_records_its_front():
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    x = torch.randn(16, 1, 8, 8)
    compiled = hetcomp.compile(model, TIERS, example_inputs=(x,), strategy=hetcomp.strategies.pareto(
        population=12, generations=4, remap=False))
    pareto = compiled.manifest.extra["pareto"]
    assert pareto["tiers"] == ["sram", "reram", "photonic"] and len(pareto["front"]) >= 1
    assert len(pareto["hypervolume"]) == 4
    chosen = pareto["front"][pareto["chosen"]]
    for layer, counts in zip(compiled.manifest.layers, chosen["counts"]):
        assert sum(counts) == layer["rows"]
    assert hetcomp.strategies.default_strategy(targets.parse(TIERS)) == "pareto"
    for name in ("equal-split", "all-sram"):
        other = hetcomp.compile(model, TIERS, example_inputs=(x,), strategy=name)
        kinds = {layer["name"]: layer["assignment"] for layer in other.manifest.layers}
        assert kinds["matmul"] == "photonic"  # only photonic runs dynamic products


def test_row_split_manifest_round_trips_compactly(tmp_path):
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    x = torch.randn(16, 1, 8, 8)
    compiled = hetcomp.compile(model, TIERS, example_inputs=(x,), strategy="equal-split")
    path = compiled.manifest.save(tmp_path / "manifest.json")
    record = hetcomp.Manifest.load(path).layer("blocks.0.fc1")
    assert record["assignment"] == {"sram": 22, "reram": 21, "photonic": 21}
    assert len(record["row_tiers"]["codes"]) == 64
    assert set(record["row_tiers"]["tiers"]) == {"sram", "reram", "photonic"}
    again = hetcomp.apply_manifest(model, path, (x,))
    original = {a.layer.name: a.row_targets for _, a in mappable_nodes(compiled.graph)}
    assert {a.layer.name: a.row_targets for _, a in mappable_nodes(again.graph)} == original
    with torch.no_grad(), tier_sim.ideal():
        assert torch.allclose(again.module(x), model(x), atol=1e-5)


def test_pythia_shaped_model_compiles_for_three_tiers():
    from hetcomp.zoo import pythia_70m_shaped

    torch.manual_seed(0)
    model = pythia_70m_shaped().eval()
    ids = torch.randint(0, 50304, (1, 8))
    compiled = hetcomp.compile(model, TIERS, example_inputs=(ids,), strategy="equal-split")
    layers = compiled.manifest.layers
    assert sum(layer["kind"] == "weight-static" for layer in layers) == 24  # H3PIMAP Table III: 24 linear
    assert sum(layer["kind"] == "dynamic" for layer in layers) == 12  # and 12 matmuls
    assert compiled.manifest.layer("blocks.0.fc1")["macs"] == 8 * 512 * 2048
    with torch.no_grad(), tier_sim.ideal():
        assert torch.allclose(compiled.module(ids), model(ids), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_split_lowering_runs_on_cuda():
    torch.manual_seed(0)
    model = DigitsTransformer().cuda().eval()
    x = torch.randn(8, 1, 8, 8, device="cuda")
    compiled = hetcomp.compile(model, TIERS, example_inputs=(x,), strategy="equal-split")
    with torch.no_grad(), tier_sim.ideal():
        assert torch.allclose(compiled.module(x), model(x), atol=1e-5)


class _CrossEntropy:
    """A lower-is-better quality (like perplexity) that can simulate a crash after ``crash_after`` calls."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.calls, self.crash_after = 0, crash_after

    def __call__(self, module, data) -> float:
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        x, y = data
        return float(torch.nn.functional.cross_entropy(module(x), y))


def _remap_strategy(quality, checkpoint=None, tolerance=0.05, max_steps=60):
    return hetcomp.strategies.pareto(population=12, generations=5, tolerance=tolerance, step=4, repeats=2,
                                     max_steps=max_steps, quality=quality, higher_is_better=False,
                                     checkpoint=checkpoint)


def test_row_remap_with_a_lower_is_better_quality(teacher_task):
    model, data = teacher_task
    compiled = hetcomp.compile(model, "digital+noisytier", data=data, strategy=_remap_strategy(_CrossEntropy()))
    remap = compiled.manifest.extra["row_remap"]
    assert remap["metric"] == "quality" and remap["higher_is_better"] is False
    trajectory = remap["trajectory"]
    assert trajectory[0]["quality"] > remap["baseline_quality"] + 0.05  # noisy start: loss well above digital
    assert remap["met"] and trajectory[-1]["quality"] <= remap["baseline_quality"] + 0.05 + 1e-9


def test_killed_row_remap_resumes_to_the_same_result(teacher_task, tmp_path):
    model, data = teacher_task
    settings = {"tolerance": 0.0, "max_steps": 4}  # stops on max_steps: 5 trajectory entries
    reference = hetcomp.compile(model, "digital+noisytier", data=data,
                                strategy=_remap_strategy(_CrossEntropy(), **settings))
    expected = reference.manifest.extra["row_remap"]["trajectory"]
    assert len(expected) == 5
    checkpoint = tmp_path / "remap"
    # baseline (1 call) + candidates + start (2 repeats each) + one step: killed during the second step
    candidates = len(reference.manifest.extra["row_remap"]["candidates"])
    tiers = len(reference.manifest.extra["row_remap"]["tier_quality"])  # each tier alone, measured first
    crash_after = 1 + 2 * (tiers + candidates + 1) + 2 + 1
    with pytest.raises(KeyboardInterrupt):
        hetcomp.compile(model, "digital+noisytier", data=data,
                        strategy=_remap_strategy(_CrossEntropy(crash_after), checkpoint, **settings))
    (run,) = checkpoint.iterdir()  # <checkpoint>/<run key>/progress.json (hetcomp.storage.StepLog)
    saved = __import__("json").loads((run / "progress.json").read_text())
    assert [step["record"]["state"]["step"] for step in saved["steps"]] == [0, 1]  # survived the kill
    assert all(step["tensors"] is None for step in saved["steps"])  # row counts only: JSON records
    quality = _CrossEntropy()
    resumed = hetcomp.compile(model, "digital+noisytier", data=data,
                              strategy=_remap_strategy(quality, checkpoint, **settings))
    assert resumed.manifest.extra["row_remap"]["trajectory"] == expected
    assert quality.calls == 1 + 2 * (len(expected) - 2)  # baseline + only the steps not done before the kill
    assert [a["assignment"] for a in resumed.manifest.layers] == [a["assignment"] for a in reference.manifest.layers]


def test_laft_refuses_layers_it_cannot_train():
    """The tier simulators train (LSQ, tests/test_lsq.py), so row splits over them do; a row split with rows on
    PCM does not (aihwkit's tiles need AnalogSGD, the row-split parts train under one plain SGD)."""
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with pytest.raises(ConfigError, match=r"LAFT cannot fine-tune .*row-split over digital\+sram\+pcm"):
        hetcomp.compile(model, "pcm+sram+digital", data=(x, y), strategy="equal-split",
                        finetune=hetcomp.LAFT(epochs=1), hessian={"probes": 2, "max_iter": 3})


def test_equal_split_needs_no_cost_model_but_the_search_does():
    plain = Target(name="nocost", description="a user tier without a cost model", analog=True,
                   precision=Precision(None, None, None), tile=None, clock_hz=None,
                   supports=frozenset({"weight-static"}), cost=CostModel())
    targets.register(plain, overwrite=True)
    try:
        gm_model = nn.Sequential(nn.Linear(4, 6))
        compiled = hetcomp.compile(gm_model, "nocost+digital", example_inputs=(torch.zeros(2, 4),),
                                   strategy="equal-split")
        assert compiled.manifest.layers[0]["assignment"] == {"digital": 3, "nocost": 3}
        with pytest.raises(ConfigError, match="have no cost model"):
            hetcomp.compile(gm_model, "nocost+digital", example_inputs=(torch.zeros(2, 4),), strategy="pareto-po")
    finally:
        targets.registry.TARGETS.unregister("nocost")


def _crossbar_reference(core, x):
    """The PIM crossbar forward written as the plain loop over input signs and bit-planes (what
    PimCrossbarCore computed before its sums were batched): one einsum per bit-plane, the ADC per column sum."""
    import math

    import torch.nn.functional as F

    s = core.settings
    x2 = x.reshape(-1, x.shape[-1])
    xq, x_scale = tier_sim.quantize(x2, s["input_bits"])
    wq, w_scale = tier_sim.quantize(core.weight, s["weight_bits"])
    cell_bits, rows = s["cell_bits"], s["xbar_rows"]
    cells = torch.stack([tier_sim._bit_planes(wq.clamp(min=0), s["weight_bits"] - 1, cell_bits),
                         tier_sim._bit_planes((-wq).clamp(min=0), s["weight_bits"] - 1, cell_bits)])
    if s.get("conductance_noise"):
        cells = tier_sim._conductance_noise(cells, 2**cell_bits - 1, s["conductance_noise"])
    sign_w = torch.tensor([1.0, -1.0]).view(2, 1, 1)
    slice_weight = (2.0 ** (cell_bits * torch.arange(cells.shape[1], dtype=x.dtype))).view(1, -1, 1)
    chunks = math.ceil(x.shape[-1] / rows)
    pad = chunks * rows - x.shape[-1]
    cells = F.pad(cells, (0, pad)).reshape(2, cells.shape[1], -1, chunks, rows)
    out = x2.new_zeros(x2.shape[0], core.weight.shape[0])
    for sign_x, part in ((1.0, xq.clamp(min=0)), (-1.0, (-xq).clamp(min=0))):
        planes = tier_sim._bit_planes(part, s["input_bits"] - 1, s["dac_bits"])
        planes = F.pad(planes, (0, pad)).reshape(planes.shape[0], -1, chunks, rows)
        for b, plane in enumerate(planes):
            sums = torch.einsum("ncr,wsocr->wsnoc", plane, cells).round().clamp(0, 2 ** s["adc_bits"] - 1)
            combined = (sums.sum(-1) * slice_weight.unsqueeze(-1) * sign_w.unsqueeze(-1)).sum((0, 1))
            out += sign_x * (2.0 ** (s["dac_bits"] * b)) * combined
    y = out * (x_scale * w_scale) + core.bias
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("tier", ["sram", "reram"])
def test_batched_crossbar_sums_equal_the_plain_loop(tier):
    """Every bit-plane, cell slice and 128-row crossbar in one batched matmul per block of samples: the same
    ADC-clipped column sums as the loop (ReRAM: the same conductance-noise draw), to float rounding."""
    torch.manual_seed(0)
    linear = nn.Linear(300, 24)  # 3 crossbars, the last partly used
    core = PIM.lower(linear, targets.get(tier))
    x = torch.randn(2, 40, 300)
    with torch.no_grad():
        torch.manual_seed(5)
        batched = core(x)
        torch.manual_seed(5)
        reference = _crossbar_reference(core, x)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
