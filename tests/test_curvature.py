"""Input curvature against exact input Hessians, decile bookkeeping on constructed failures, the
non-ideality profiles, and risk-gated routing (fraction 0 = analog, fraction 1 = digital)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hetcomp.cli import main
from hetcomp.curvature.estimator import input_curvature
from hetcomp.curvature.failures import (
    ADC_BITS,
    STATIC_WEIGHT_NOISE,
    all_profiles,
    decile_failure_rates,
    deciles,
    failure_by_decile,
    lower_all_analog,
    profile_target,
)
from hetcomp.curvature.routing import RiskRouted, risk, routing_curve
from hetcomp.errors import ConfigError
from hetcomp.lower import program_and_drift


class Quadratic(nn.Module):
    """'Logits' are the input; with loss 1/2 x^T A x the input Hessian is exactly A."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(matrix, requires_grad=False)

    def forward(self, x):
        return x

    def loss(self, out, _labels):
        return 0.5 * ((out @ self.matrix) * out).sum(-1)


def test_curvature_is_h_times_norm_of_hessian_probe_on_a_quadratic():
    dimension, scale, h = 12, 3.0, 1e-3
    model = Quadratic(scale * torch.eye(dimension, dtype=torch.float64))
    x = torch.randn(5, dimension, dtype=torch.float64)
    result = input_curvature(model, (x, torch.zeros(5)), h=h, n=7, loss_fn=model.loss)
    # ||h A v|| = h * scale * sqrt(d) for every Rademacher v: exact, whatever the probes
    torch.testing.assert_close(result.curvature, torch.full((5,), h * scale * math.sqrt(dimension),
                                                            dtype=torch.float64))
    torch.testing.assert_close(result.trace, torch.full((5,), scale * dimension, dtype=torch.float64))


def test_curvature_and_trace_match_exact_input_hessian_of_a_small_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 2, 3])
    h, probes = 1e-4, 4000
    result = input_curvature(net, (x, y), h=h, n=probes, seed=1)
    generator = torch.Generator().manual_seed(2)
    for i in range(3):
        hessian = torch.autograd.functional.hessian(lambda z, i=i: F.cross_entropy(net(z[None]), y[i : i + 1]), x[i])
        # Hutchinson trace: unbiased for Tr(H); its std per probe is sqrt(2 sum_{j!=k} H_jk^2)
        off_diagonal = (hessian**2).sum() - (hessian.diag() ** 2).sum()
        stderr = math.sqrt(2 * float(off_diagonal) / probes)
        assert abs(float(result.trace[i]) - float(hessian.trace())) < 5 * stderr + 1e-6
        # curvature ~ h E||H v||: Monte Carlo with the exact Hessian and independent probes
        v = torch.randint(0, 2, (probes, 6), generator=generator).double() * 2 - 1
        expected = h * (v @ hessian).norm(dim=1).mean()
        assert float(result.curvature[i]) == pytest.approx(float(expected), rel=0.03)


def test_curvature_is_batched_per_sample_and_seeded(digits_model):
    model, data = digits_model
    x, y = next(iter(data["test"]))
    x, y = x[:16], y[:16]
    first = input_curvature(model, (x, y), n=3, seed=4)
    again = input_curvature(model, (x, y), n=3, seed=4)
    assert torch.equal(first.curvature, again.curvature)
    # each sample's value comes from its own gradient: perturbing one sample leaves the others alone
    changed = x.clone()
    changed[0] = torch.rand_like(changed[0])
    other = input_curvature(model, (changed, y), n=3, seed=4)
    torch.testing.assert_close(other.curvature[1:], first.curvature[1:], rtol=1e-5, atol=1e-12)
    predicted = input_curvature(model, (x, y), n=3, seed=4, labels="predicted")
    assert torch.equal(predicted.labels, model(x).argmax(-1))
    with pytest.raises(ConfigError, match=r"h \(finite-difference step\) must be a finite number > 0"):
        input_curvature(model, (x, y), h=0)


def test_decile_bookkeeping_on_constructed_failures():
    rng = np.random.default_rng(0)
    curvature = torch.tensor(rng.permutation(100), dtype=torch.float64)  # 0..99 in random order
    digital_correct = torch.ones(100, dtype=torch.bool)
    digital_correct[curvature == 5] = False  # one digitally-wrong sample in decile 1
    analog_correct = torch.ones(2, 100, dtype=torch.bool)  # two repeats
    top = curvature >= 90  # decile 10
    analog_correct[0, top] = False  # repeat 0: all of decile 10 fails
    analog_correct[1, top & (curvature < 95)] = False  # repeat 1: half of it
    analog_correct[:, curvature == 5] = False  # wrong in both: not an analog-only failure
    analog_correct[0, curvature == 42] = False  # one failure in decile 5, repeat 0
    rates = decile_failure_rates(curvature, digital_correct, analog_correct)
    assert rates[9] == pytest.approx(0.75)  # (10 + 5) / (2 * 10)
    assert rates[4] == pytest.approx(1 / 20)
    assert rates[0] == 0.0 and all(r == 0 for i, r in enumerate(rates) if i not in (4, 9))
    # bins cover every sample once, in curvature order, with sizes differing by at most one
    bins = deciles(torch.arange(23.0))
    assert sorted(np.concatenate(bins).tolist()) == list(range(23)) and {len(b) for b in bins} == {2, 3}
    assert all(bins[k].max() < bins[k + 1].min() for k in range(9))
    nobody = decile_failure_rates(curvature, torch.zeros(100, dtype=torch.bool), analog_correct)
    assert all(math.isnan(r) for r in nobody)
    # per-decile 95% intervals over repeats and samples: around each rate, empty where nothing fails
    intervals: list = []
    assert decile_failure_rates(curvature, digital_correct, analog_correct, intervals=intervals) == rates
    assert len(intervals) == 10 and intervals[0] == (0.0, 0.0)
    low, high = intervals[9]
    assert 0.2 < low < 0.75 < high <= 1.0  # 15 failures of 20 (repeat x sample) cells, 10 samples
    assert intervals[4][0] == 0.0 < intervals[4][1] < 0.3  # one failure in 20 cells: 0 is inside


def test_profiles_switch_non_idealities_on_and_off(digits_model):
    model, data = digits_model
    x = next(iter(data["test"]))[0][:32]
    assert len(all_profiles()) == 8 and all_profiles()[0] == () and all_profiles()[-1] == ("ADC", "WNoise", "PCM")
    outputs = {}
    for enabled in [(), ("PCM",)]:
        lowered, report = lower_all_analog(model, x[:2], profile_target(enabled))
        lowered.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            program_and_drift(lowered, report, 86400.0)
            outputs[enabled] = lowered(x)
    with torch.no_grad():
        digital = model(x)
    torch.testing.assert_close(outputs[()], digital, rtol=1e-4, atol=1e-4)  # ideal analog = digital
    assert (outputs[("PCM",)] - digital).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="unknown non-ideality"):
        profile_target(("TIA",))


def _boundary_classifier() -> nn.Module:
    """Two classes split by the hand-set boundary x0 = 0: logits (x1 + x0, x1 - x0). Input x1 adds the same to
    both logits, but through devices of their own: their noise moves the boundary (no weight sits at 0 conductance,
    where aihwkit clamps noise away)."""
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
        model[0].bias.zero_()
    return model.eval()


def test_top_curvature_decile_fails_more_than_the_bottom_one_on_a_constructed_boundary():
    """The paper's central claim (Sharma et al.: high input curvature -> vulnerable to hardware noise), built in.

    For this linear classifier the input Hessian of the cross-entropy is p(1 - p) d d^T (d = (2, 0)), so the
    curvature falls monotonically with the distance |x0| to the boundary. 10 samples lie within 1e-4 of it (five
    per class), 90 at 1 to 10 from it: D10 is the near ten (curvature ~ h p(1 - p) |d|^2 with p = 1/2, against
    p(1 - p) < 0.11 for the others), D1 ten of the far ones. After the simulator's input normalization a far
    sample keeps a logit margin of 2 (no analog noise here comes near it), a near one < 2e-4, below any noise
    or quantization step. So every non-ideal profile flips D10 samples and never a D1 sample, on any CPU."""
    distance = torch.cat([torch.logspace(-5, -4, 10), torch.logspace(0, 1, 90)])
    x0 = distance * torch.tensor([1.0, -1.0]).repeat(50)  # classes alternate along the distance
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    x = torch.stack([x0, torch.ones(100)], 1)[order]
    y = (x[:, 0] < 0).long()
    model = _boundary_classifier()
    curvature = input_curvature(model, (x, y), n=2).curvature
    bins = deciles(curvature)
    near = torch.nonzero(x[:, 0].abs() < 1e-3).flatten()
    assert set(bins[9].tolist()) == set(near.tolist())  # the construction holds: D10 = the near ten
    assert bool((x[bins[0], 0].abs() >= 1).all())
    analysis = failure_by_decile(model, (x, y), curvature, repeats=4)
    assert analysis.digital_accuracy == 1.0 and analysis.rates["ideal"] == [0.0] * 10
    for name in analysis.profiles[1:]:  # ADC, WNoise, PCM and every combination
        rates = analysis.rates[name]
        assert rates[0] == 0.0 and rates[9] >= 0.3, (name, rates)  # about 0.5: one class flips per programming
        assert rates[9] > rates[0]
        assert analysis.d10_above_d1(name), (name, analysis.intervals[name])  # intervals separate
    assert not analysis.d10_above_d1("ideal")


def test_adc_profile_quantizes_outputs_to_the_9_bit_grid():
    """ADC: outputs on a grid of 2 out_bound / (2^9 - 2) in units of max|x| * max|W| (aihwkit's input and weight
    normalization), computed here by hand; the ideal profile returns the digital outputs."""
    model = _boundary_classifier()
    x = torch.tensor([[0.3, 1.0], [0.05, 1.0], [-0.7, 1.0], [0.5, 0.5], [2.0, 0.1]])
    step = 2 * 12.0 / (2**ADC_BITS - 2)  # out_bound 12 (the PCM target's ADC range)
    assert profile_target(("ADC",)).device["out_bound"] == 12.0 and ADC_BITS == 9
    scale = x.abs().amax(1, keepdim=True)
    with torch.no_grad():
        digital = model(x)
        expected = torch.round(digital / scale / step) * step * scale  # e.g. 1.3 -> 28 steps = 1.3176
        outputs = {}
        for enabled in [(), ("ADC",)]:
            lowered, report = lower_all_analog(model, x[:2], profile_target(enabled))
            lowered.eval()
            program_and_drift(lowered, report, 86400.0)
            outputs[enabled] = lowered(x)
    torch.testing.assert_close(outputs[()], digital, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outputs[("ADC",)], expected, rtol=1e-5, atol=1e-6)
    assert float((outputs[("ADC",)] - digital).abs().max()) > 0.01


def test_wnoise_profile_is_static_weight_noise_of_2_percent_of_g_max():
    """WNoise: Gaussian noise of std 2% of g_max on every device at programming, nothing at read. Weights are +-1
    (= +-g_max on one device of the pair, 0 on the other, clamped at 0 after the noise), so each weight's error is
    N(0, s) - max(N(0, s), 0) with s = 0.02: RMS s * sqrt(3/2) by hand. The per-weight errors are recovered
    exactly from the outputs by least squares (the profile has no output noise or quantization)."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(0, 2, (64, 64)).float() * 2 - 1)
    model = nn.Sequential(layer).eval()
    x = torch.randn(256, 64)
    lowered, report = lower_all_analog(model, x[:2], profile_target(("WNoise",)))
    lowered.eval()
    with torch.no_grad():
        digital = model(x)
        program_and_drift(lowered, report, 86400.0)
        first, again = lowered(x), lowered(x)
        program_and_drift(lowered, report, 86400.0)
        reprogrammed = lowered(x)
    assert torch.equal(first, again)  # static: no read noise
    assert not torch.equal(first, reprogrammed)  # drawn afresh at every programming
    error = torch.linalg.lstsq(x, first - digital).solution.T  # [out, in] weight errors
    assert float(error.pow(2).mean().sqrt()) == pytest.approx(STATIC_WEIGHT_NOISE * math.sqrt(1.5), rel=0.15)
    # the clamped device only adds: the error leans against the weight's sign by s / sqrt(2 pi)
    lean = -STATIC_WEIGHT_NOISE / math.sqrt(2 * math.pi)
    assert float((error * layer.weight.detach()).mean()) == pytest.approx(lean, rel=0.25)


def test_routing_fraction_zero_is_analog_and_one_is_digital(digits_model):
    model, data = digits_model
    x = next(iter(data["test"]))[0]
    analog, _ = lower_all_analog(model, x[:2], profile_target(("ADC", "PCM")))
    analog.eval()
    routed = RiskRouted(analog, model, score="margin")
    with torch.no_grad():
        assert routed.calibrate(x, 0.0) == float("inf")
        torch.manual_seed(3)
        expected = analog(x)
        torch.manual_seed(3)
        assert torch.equal(routed(x), expected) and not routed.last_routed.any()
        routed.calibrate(x, 1.0)
        torch.testing.assert_close(routed(x), model(x))
        assert routed.last_routed.all()
        torch.manual_seed(5)
        routed.calibrate(x, 0.25)
        torch.manual_seed(5)
        scores = risk(analog(x), "margin")  # the same noisy analog pass calibrate saw
        torch.manual_seed(5)
        routed(x)
        # The riskiest quarter is routed, plus any input tied with the last of it: ties occur (the ADC quantizes
        # the outputs), and how many depends on the trained weights, so the count is not exactly a quarter.
        count = round(0.25 * len(x))
        last = scores.sort(descending=True).values[count - 1]
        assert routed.threshold == float(last)
        assert torch.equal(routed.last_routed, scores >= last)
        assert int((scores > last).sum()) < count <= int(routed.last_routed.sum())


def test_routing_curve_endpoints_and_auroc_on_constructed_logits():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    digital = F.one_hot(labels, 2).double() * 4
    analog = digital.clone()[None].repeat(2, 1, 1)
    analog[:, :2] = torch.tensor([[1.0, 1.2], [1.1, 1.0]]).double()  # two low-margin analog failures
    curve = routing_curve(analog, digital, labels, fractions=(0.0, 0.25, 1.0))
    assert curve.accuracy["margin"] == [0.75, 1.0, 1.0]  # routing the 2 riskiest fixes both
    assert curve.random == [0.75, 0.75 + 0.25 * 0.25, 1.0]
    assert curve.auroc["margin"] == 1.0
    assert risk(torch.tensor([[5.0, 0.0]]), "entropy") < risk(torch.tensor([[0.1, 0.0]]), "entropy")


def test_cli_curvature_prints_table_and_writes_plots(tmp_path, capsys):
    code = main(["--quiet", "curvature", "examples/digits_cnn.py:build", "--repeats", "1", "--probes", "2",
                 "--split", "val,test", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "ADC+WNoise+PCM" in out and "D10 FR %" in out and "AUROC" in out
    assert "62-63 samples per decile" in out  # val (269) + test (359) digits, joined in that order
    assert (tmp_path / "failure_by_decile.png").stat().st_size > 1000 and (tmp_path / "routing.png").exists()
    assert main(["curvature", "examples/digits_cnn.py:build", "--split", "nope", "--out", str(tmp_path)]) == 2
