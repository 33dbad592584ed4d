"""Grouped and depthwise convolutions on several tiers: tier simulators, row splits in whole groups, strategies."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp import targets
from hetcomp.errors import ConfigError
from hetcomp.graph import mappable_nodes, trace
from hetcomp.graph.layers import LayerInfo
from hetcomp.lower import digital_state_dict, lower_graph, tier_sim
from hetcomp.lower.tier_sim import PhotonicSimulator, PimCrossbarSimulator
from hetcomp.manifest import decode_row_targets
from hetcomp.partition.mapping_cost import MappingProblem
from hetcomp.partition.rows import apply_counts
from hetcomp.passes.row_remap import _plan_move
from hetcomp.targets.base import Precision, Target, TileGeometry
from hetcomp.targets.cost import CostModel, EnergyTerm

PIM, PHOTONIC = PimCrossbarSimulator(), PhotonicSimulator()

TIERS = "sram+reram+photonic"


class _GroupedNet(nn.Module):
    """A grouped conv (2 groups of 4 rows), a depthwise conv, a grouped 1x1 conv (4 groups of 3 rows), a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 12, 1, groups=4)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.pointwise(x))
        return self.fc(x.flatten(1))


GROUP_ROWS = {"grouped": 4, "depthwise": 1, "pointwise": 3}


def _model_and_data(samples: int = 64) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = _GroupedNet().eval()
    x = torch.randn(samples, 4, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(-1)  # the model's own labels: digital accuracy is 1.0
    return model, (x, y)


def _assert_whole_groups(manifest) -> None:
    """Every grouped layer's rows per tier are whole groups, and each group's rows share one tier."""
    for layer in manifest.layers:
        size = GROUP_ROWS.get(layer["name"])
        if size is None:
            continue
        assert layer["groups"] * size == layer["rows"]
        assignment = layer["assignment"]
        if isinstance(assignment, dict):
            assert all(rows % size == 0 for rows in assignment.values()), (layer["name"], assignment)
            row_tiers = decode_row_targets(layer["row_tiers"])
            for start in range(0, layer["rows"], size):
                assert len(set(row_tiers[start : start + size])) == 1, (layer["name"], row_tiers)
            assert {t: row_tiers.count(t) for t in set(row_tiers)} == assignment


def test_tier_simulators_lower_grouped_and_depthwise_convs():
    torch.manual_seed(0)
    cases = [(nn.Conv2d(4, 8, 3, padding=1, groups=2), torch.randn(2, 4, 6, 6)),
             (nn.Conv2d(8, 8, 3, stride=2, groups=8), torch.randn(2, 8, 7, 7)),  # depthwise
             (nn.Conv2d(8, 8, 3, padding="same", dilation=2, padding_mode="reflect", groups=8),
              torch.randn(2, 8, 7, 7)),
             (nn.Conv1d(6, 9, 3, padding=1, groups=3), torch.randn(2, 6, 11))]
    for conv, x in cases:
        for name, lower in (("reram", PIM.lower), ("photonic", PHOTONIC.lower)):
            simulated = lower(conv, targets.get(name))
            with torch.no_grad():
                reference = conv(x)
                with tier_sim.ideal():
                    assert torch.allclose(simulated(x), reference, atol=1e-5), (conv, name)
                noisy = simulated(x)
            assert noisy.shape == reference.shape
            assert not torch.allclose(noisy, reference, atol=1e-4), (conv, name)  # the simulation is in the path
            assert float((noisy - reference).abs().max()) < 0.2 * float(reference.abs().max())
            weight, bias = PIM.digital_weights(simulated)
            assert torch.equal(weight, conv.weight) and torch.equal(bias, conv.bias)


def test_row_split_grouped_convs_equal_the_original_with_simulators_ideal():
    model, (x, _) = _model_and_data(6)
    gm = trace(model, (x,))
    target_set = targets.parse(TIERS + "+digital")  # digital parts: exact slices, no simulator
    tiers = [target_set[name] for name in ("sram", "reram", "photonic", "digital")]
    counts = {"grouped": [4, 0, 4, 0], "depthwise": [3, 2, 1, 2], "pointwise": [3, 3, 0, 6], "fc": [1, 1, 1, 2]}
    for _, annotation in mappable_nodes(gm):
        annotation.metrics["row_sensitivity"] = torch.rand(annotation.layer.rows).tolist()
        apply_counts(annotation, counts[annotation.layer.name], tiers, "test")
    lowered, report = lower_graph(gm, target_set)
    assert {entry["simulator"] for entry in report.values()} == {"row-split"}
    part = lowered.get_submodule("pointwise").parts["digital"]
    assert (part.groups, part.in_channels, part.out_channels) == (2, 4, 6)  # a conv over just its groups
    with torch.no_grad():
        reference = model(x)
        with tier_sim.ideal():
            assert torch.allclose(lowered(x), reference, atol=1e-5)
        assert not torch.allclose(lowered(x), reference, atol=1e-4)
    state = digital_state_dict(lowered, report)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_row_split_grouped_conv1d_equals_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(6, 9, 3, padding=1, groups=3)).eval()
    x = torch.randn(4, 6, 10)
    gm = trace(model, (x,))
    (_, annotation), = mappable_nodes(gm)
    apply_counts(annotation, [3, 0, 6], list(targets.parse(TIERS)), "test")
    lowered, _ = lower_graph(gm, targets.parse(TIERS))
    with torch.no_grad(), tier_sim.ideal():
        assert torch.allclose(lowered(x), model(x), atol=1e-5)


def test_splitting_a_group_is_refused_before_any_work():
    model, (x, _) = _model_and_data(2)
    gm = trace(model, (x,))
    target_set = targets.parse(TIERS)
    annotation = next(a for _, a in mappable_nodes(gm) if a.layer.name == "grouped")
    with pytest.raises(ConfigError, match="whole groups of 4 rows"):
        apply_counts(annotation, [2, 2, 4], list(target_set), "test")
    for _, other in mappable_nodes(gm):
        other.assignment = "photonic"
    annotation.assignment = {"sram": 4, "photonic": 4}  # as a hand-edited manifest might say
    annotation.row_targets = ["sram", "sram", "photonic", "photonic", "photonic", "photonic", "sram", "sram"]
    with pytest.raises(ConfigError, match="layer 'grouped'.*not whole groups"):
        lower_graph(gm, target_set)


def test_groups_go_to_tiers_by_summed_sensitivity():
    gm = trace(nn.Sequential(nn.Conv2d(4, 8, 1, groups=2), nn.Conv2d(8, 8, 1, groups=8)), (torch.zeros(1, 4, 2, 2),))
    (_, grouped), (_, depthwise) = mappable_nodes(gm)
    grouped.metrics["row_sensitivity"] = [3.0, 0, 0, 0, 1, 1, 1, 1]  # group 1 sums to more, though row 0 is top
    depthwise.metrics["row_sensitivity"] = [0.1, 5.0, 0.2, 3.0, 0.0, 1.0, 0.3, 0.4]  # one row per group
    tiers = list(targets.parse(TIERS))  # sram (most accurate), reram, photonic
    apply_counts(grouped, [4, 0, 4], tiers, "test")
    assert grouped.row_targets == ["photonic"] * 4 + ["sram"] * 4
    apply_counts(depthwise, [2, 1, 5], tiers, "test")
    assert depthwise.row_targets == ["photonic", "sram", "photonic", "sram", "photonic", "reram", "photonic",
                                     "photonic"]


def test_row_remap_moves_whole_groups():
    layers = [LayerInfo("g", "weight-static", "conv2d", (8, 2, 3, 3), 8, 144, 8000, "g", groups=2),
              LayerInfo("fc", "weight-static", "linear", (4, 8), 4, 32, 32, "fc")]
    problem = MappingProblem.build(layers, targets.parse("sram+reram"))
    assert problem.unit.tolist() == [4, 1]
    counts = np.array([[0, 8], [0, 4]])  # everything on reram
    free = [True, True]

    def move(sensitivity, step_rows):
        new, moved = _plan_move(problem, counts, sensitivity, free, step_rows)
        assert (new.sum(axis=1) == [8, 4]).all() and new[0, 0] % 4 == 0
        return moved

    # per-unit sensitivities in rank order: the group first moves whole even though the step is one row
    assert move([np.array([5.0, 1.0]), np.array([3.0, 2.0, 0.5, 0.1])], 1) == {"g: reram->sram": 4}
    assert move([np.array([5.0, 1.0]), np.array([3.0, 2.0, 0.5, 0.1])], 6) == {"g: reram->sram": 4,
                                                                               "fc: reram->sram": 2}
    # a group that would overshoot the step waits; single rows fill it
    assert move([np.array([2.5, 1.0]), np.array([3.0, 2.0, 0.5, 0.1])], 3) == {"fc: reram->sram": 3}


@pytest.mark.parametrize("strategy,target", [("pareto-po", TIERS), ("equal-split", TIERS), ("pareto", TIERS),
                                             ("pareto-po", "sram+reram")])  # sram+reram: a front of real splits
def test_multitier_strategies_keep_groups_whole_and_evaluate(strategy, target):
    model, data = _model_and_data()
    if strategy == "pareto":
        compiled = hetcomp.compile(model, target, data=data, hessian={"probes": 2, "max_iter": 3, "batches": 1},
                                   strategy=hetcomp.strategies.pareto(population=8, generations=3, max_steps=2,
                                                                      repeats=1, candidates=2))
        assert "row_remap" in compiled.manifest.extra
    else:
        compiled = hetcomp.compile(model, target, example_inputs=(data[0][:8],), strategy=strategy)
    _assert_whole_groups(compiled.manifest)
    if target == "sram+reram":
        assert isinstance(compiled.manifest.layer("grouped")["assignment"], dict)  # the chosen point splits it
    if strategy == "equal-split":  # 4 groups of 3 rows over 3 tiers: 2 + 1 + 1 groups
        assert compiled.manifest.layer("pointwise")["assignment"] == {"sram": 6, "reram": 3, "photonic": 3}
        assert compiled.manifest.layer("grouped")["assignment"] == {"sram": 4, "reram": 4}
    for point in compiled.manifest.extra.get("pareto", {}).get("front", []):  # every point of the search
        for layer, counts in zip(compiled.manifest.layers, point["counts"]):
            assert all(c % GROUP_ROWS.get(layer["name"], 1) == 0 for c in counts)
    result = compiled.evaluate(data, repeats=1)
    assert 0.0 <= result.mean <= 1.0
    with torch.no_grad(), tier_sim.ideal():
        assert torch.allclose(compiled.module(data[0][:8]), model(data[0][:8]), atol=1e-5)


def test_row_remap_moves_grouped_rows_to_the_accurate_tier():
    """A very noisy cheap tier: stage 1 puts everything there, row remap then moves groups to digital."""
    noisy = Target(name="noisygroups", description="test tier with large relative input noise", analog=True,
                   precision=Precision(None, None, None), tile=TileGeometry(8, 8), clock_hz=1e9,
                   supports=frozenset({"weight-static", "dynamic"}),
                   cost=CostModel(1e13, (EnergyTerm("mac", 0.01, 1.0, "test"),)), accuracy_rank=9,
                   simulator="photonic", device={"input_bits": None, "weight_bits": None, "output_bits": None,
                             "input_noise_rel": 1.5})
    targets.register(noisy, overwrite=True)
    try:
        model, data = _model_and_data()
        strategy = hetcomp.strategies.pareto(population=8, generations=3, tolerance=0.0, step=6, max_steps=4,
                                             repeats=1, candidates=1)
        compiled = hetcomp.compile(model, "digital+noisygroups", data=data, strategy=strategy,
                                   hessian={"probes": 2, "max_iter": 3, "batches": 1})
    finally:
        targets.registry.TARGETS.unregister("noisygroups")
    trajectory = compiled.manifest.extra["row_remap"]["trajectory"]
    assert any(move.startswith(("grouped:", "pointwise:")) for step in trajectory[1:] for move in step["moved"])
    for step in trajectory[1:]:
        for move, rows in step["moved"].items():
            assert rows % GROUP_ROWS.get(move.split(":")[0], 1) == 0, step["moved"]
    _assert_whole_groups(compiled.manifest)
