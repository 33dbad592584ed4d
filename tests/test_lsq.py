"""LSQ quantization-aware training of the torch tier simulators (PIM crossbar, photonic): equivalence with the
post-training forward at today's scales, LSQ's gradients against a hand computation, the weights carried back,
and LAFT through crossbar, photonic and row-split layers."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetcomp
from hetcomp import targets
from hetcomp.finetune import stage as stage_module
from hetcomp.graph import mappable_nodes
from hetcomp.lower import tier_sim
from hetcomp.lower.tier_sim import PhotonicSimulator, PimCrossbarSimulator

PIM, PHOTONIC = PimCrossbarSimulator(), PhotonicSimulator()


def _target(name: str, **device) -> hetcomp.targets.base.Target:
    base = targets.get(name)
    return dataclasses.replace(base, device={**base.device, **device})


def _lowered(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor, object]:
    """(source layer, its lowered core, an input, the simulator) for each kind of core the tier simulators build."""
    torch.manual_seed(0)
    if kind == "sram-linear":  # 300 inputs: 3 crossbars, a 7-bit ADC that clips: the bit-serial path runs
        layer, x, sim, target = nn.Linear(300, 24), torch.randn(40, 300), PIM, targets.get("sram")
    elif kind == "reram-grouped-conv":  # conductance noise drawn on every read, one core per group
        layer, x, sim, target = nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.randn(5, 4, 6, 6), PIM, \
            targets.get("reram")
    elif kind == "photonic-linear":
        layer, x, sim, target = nn.Linear(20, 7), torch.randn(30, 20), PHOTONIC, targets.get("photonic")
    else:  # photonic-conv
        layer, x, sim, target = nn.Conv2d(3, 5, 3), torch.randn(4, 3, 6, 6), PHOTONIC, targets.get("photonic")
    return layer, sim.lower(layer, target), x, sim


def _cores(module: nn.Module) -> list[nn.Module]:
    return list(module.cores) if isinstance(module, tier_sim.UnfoldConv) else [module]


KINDS = ["sram-linear", "reram-grouped-conv", "photonic-linear", "photonic-conv"]


@pytest.mark.parametrize("kind", KINDS)
def test_lsq_at_todays_scales_is_todays_forward_bit_for_bit(kind):
    """The first training forward sets every step to today's per-tensor scale (max|v| / Qp) and must then compute
    exactly today's post-training forward, drawing the same noise (the RNG ends in the same state)."""
    _, core, x, _ = _lowered(kind)
    core.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        today = core(x)
        state_today = torch.get_rng_state()
    trained = copy.deepcopy(core).train()
    torch.manual_seed(7)
    lsq = trained(x)
    assert torch.equal(torch.get_rng_state(), state_today)
    assert lsq.requires_grad and torch.equal(lsq.detach(), today)
    for part in _cores(trained):
        levels = 2 ** (part.settings["weight_bits"] - 1) - 1
        assert part.weight_step.item() == (part.weight.abs().max() / levels).item()
    # eval after that first step: weights at the learned (here: today's) step, inputs per call as a fresh core
    trained.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        assert torch.equal(trained(x), today)
        torch.manual_seed(7)
        with tier_sim.learned_input_steps():  # the steps were set from this very x: today's scales again
            assert torch.equal(trained(x), today)


def test_photonic_dynamic_product_at_todays_scales_is_unchanged_and_trains_both_steps():
    core = PHOTONIC.lower(None, targets.get("photonic"))
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 16, 6, requires_grad=True)
    with torch.no_grad():
        torch.manual_seed(3)
        today = core.eval()(a, b)
    torch.manual_seed(3)
    y = core.train()(a, b)
    assert torch.equal(y.detach(), today)
    y.square().sum().backward()
    assert {name for name, _ in core.named_parameters()} == {"input_step", "other_step"}
    assert core.input_step.grad.abs() > 0 and core.other_step.grad.abs() > 0
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def _lsq_by_hand(v: torch.Tensor, step: float, levels: int, upstream: torch.Tensor) -> tuple[torch.Tensor, float]:
    """LSQ (Esser et al. 2020, Eq. 3 and the gradient scale of section 2.2) written out element by element:
    (dL/dv, dL/ds) given dL/dv_bar, v_bar = round(clip(v / s, -Qp, Qp)) s."""
    grad_v = torch.zeros_like(v)
    grad_s = 0.0
    for index in range(v.numel()):
        ratio = v.flatten()[index].item() / step
        g = upstream.flatten()[index].item()
        if ratio <= -levels:
            grad_s += g * -levels
        elif ratio >= levels:
            grad_s += g * levels
        else:
            grad_s += g * (round(ratio) - ratio)
            grad_v.view(-1)[index] = g
    return grad_v, grad_s / math.sqrt(v.numel() * levels)


@pytest.mark.parametrize("tier", ["sram-wide-adc", "photonic-noiseless"])
def test_gradients_reach_weights_inputs_and_steps_as_lsq_computes_them(tier):
    """y = x_bar W_bar^T + b exactly (a 16-bit ADC, or a noiseless photonic core without output quantization), steps
    below max-abs so that some inputs and weights clip: every gradient equals LSQ's, worked out by hand."""
    torch.manual_seed(1)
    layer = nn.Linear(6, 3)
    if tier == "sram-wide-adc":
        core = PIM.lower(layer, _target("sram", adc_bits=16, input_bits=4, weight_bits=4))
    else:
        core = PHOTONIC.lower(layer, _target("photonic", input_noise_rel=0.0, output_bits=None, input_bits=4,
                                             weight_bits=4))
    x = torch.randn(5, 6)
    core.train()(x)  # the first training forward sets the steps
    with torch.no_grad():
        core.input_step.mul_(0.6)
        core.weight_step.mul_(0.7)
    x = x.clone().requires_grad_(True)
    upstream = torch.randn(5, 3)
    (core(x) * upstream).sum().backward()

    levels = 7
    sx, sw = core.input_step.item(), core.weight_step.item()
    w = core.weight.detach()
    x_bar = torch.round(x.detach() / sx).clamp(-levels, levels) * sx
    w_bar = torch.round(w / sw).clamp(-levels, levels) * sw
    assert (x.detach().abs() > levels * sx).any() and (w.abs() > levels * sw).any()  # both clip somewhere
    grad_x, grad_sx = _lsq_by_hand(x.detach(), sx, levels, upstream @ w_bar)  # y = x_bar w_bar^T: dL/dx_bar
    grad_w, grad_sw = _lsq_by_hand(w, sw, levels, upstream.t() @ x_bar)
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(core.weight.grad, grad_w)
    torch.testing.assert_close(core.bias.grad, upstream.sum(0))
    assert core.input_step.grad.item() == pytest.approx(grad_sx, rel=1e-4)
    assert core.weight_step.grad.item() == pytest.approx(grad_sw, rel=1e-4)


def test_crossbar_backward_is_the_straight_through_estimator_of_the_whole_crossbar():
    """With a 4-bit ADC clipping the 128-row column sums the forward is far from x_bar W_bar^T, but the gradient
    w.r.t. the input is that of x_bar W_bar^T (the crossbar passed straight through, then LSQ's STE through the
    input quantizer)."""
    torch.manual_seed(0)
    layer = nn.Linear(300, 8)
    with torch.no_grad():
        layer.weight.abs_()  # positive weights and inputs: column sums large enough to saturate the ADC
    core = PIM.lower(layer, _target("sram", adc_bits=4)).train()
    x = torch.rand(16, 300, requires_grad=True)
    y = core(x)
    exact = x.detach() @ layer.weight.detach().t() + layer.bias.detach()
    assert (y - exact).abs().max() > 0.05 * exact.abs().max()  # the ADC clips: not the float product
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    sw = core.weight_step.detach()
    w_bar = torch.round(core.weight.detach() / sw).clamp(-127, 127) * sw
    inside = x.detach().abs() < 127 * core.input_step.detach()
    torch.testing.assert_close(x.grad, (upstream @ w_bar) * inside)


def _trained_core(kind: str, shrink: float) -> tuple[nn.Module, nn.Module, torch.Tensor, object]:
    """A lowered core after a training forward and a simulated update: weights moved, weight steps x ``shrink``."""
    layer, core, x, sim = _lowered(kind)
    core.train()(x)
    with torch.no_grad():
        for part in _cores(core):
            part.weight.add_(0.01 * torch.randn_like(part.weight))
            part.weight_step.mul_(shrink)
    return layer, core.eval(), x, sim


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shrink", [0.6, 1.5])
def test_weights_carried_back_reproduce_the_trained_layer(kind, shrink):
    """digital_weights is W clipped at the learned range: the lowered layer's ideal output is that digital layer's,
    and lowering it again derives the learned weight step and integers, so the fresh layer computes what the
    trained one does (same noise draws). Above the cap (shrink 1.5) the step is max|W| / Qp and W comes back as is."""
    layer, core, x, sim = _trained_core(kind, shrink)
    weight, bias = sim.digital_weights(core)
    raw = torch.cat([part.weight.detach() for part in _cores(core)]).reshape(weight.shape)
    assert torch.equal(weight, raw) == (shrink > 1)  # clipped only where the learned step cuts into W
    digital = copy.deepcopy(layer)
    with torch.no_grad():
        digital.weight.copy_(weight)
        digital.bias.copy_(bias)
    with torch.no_grad(), tier_sim.ideal():
        torch.testing.assert_close(core(x), digital(x), rtol=1e-5, atol=1e-5)
    target = {"sram-linear": "sram", "reram-grouped-conv": "reram"}.get(kind, "photonic")
    fresh = sim.lower(digital, targets.get(target)).eval()
    with torch.no_grad():
        torch.manual_seed(11)
        trained_out = core(x)
        torch.manual_seed(11)
        assert torch.equal(fresh(x), trained_out)


def test_the_step_lowering_derives_from_the_carried_back_weight_is_the_learned_one_for_any_step():
    """Float arithmetic: for a step s, no weight b need satisfy b / Qp == s exactly; the core uses the step its
    clipping bound implies, so the max-abs scale of the carried-back weight equals it for every step (checked on
    500 steps at 3 to 8 bits; about 1-14% of them are not b / Qp for any float b)."""
    torch.manual_seed(0)
    for bits in (8, 6, 4, 3):
        core = PHOTONIC.lower(nn.Linear(30, 10), _target("photonic", input_bits=bits, weight_bits=bits)).train()
        core(torch.randn(4, 30))
        levels, cap = 2 ** (bits - 1) - 1, core.weight_step.detach().clone()
        for factor in torch.rand(125) * 0.98 + 0.01:
            with torch.no_grad():
                core.weight_step.copy_(cap * factor)
                used = core._step("weight")
                carried = core.float_weight()
            assert used < cap and (carried.abs().max() / levels) == used, (bits, factor.item())


# --- LAFT through the tier simulators -------------------------------------------------------------------------


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4 * 4 * 4, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _task(samples: int = 256) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """An untrained model and labels it does not fit yet (which quadrant of the image is brightest): fine-tuning has
    something to gain."""
    torch.manual_seed(0)
    model = _Small().eval()
    x = torch.randn(samples, 1, 4, 4)
    y = F.avg_pool2d(x, 2).flatten(1).argmax(-1)
    return model, (x, y)


def _laft_with_record(monkeypatch, model, data, target_set, strategy, **laft):
    """Compile with LAFT, recording every (lowered module, carried-back state) the stages produce."""
    record = []
    original = stage_module.digital_state_dict

    def recording(lowered, report):
        state = original(lowered, report)
        record.append((copy.deepcopy(lowered), state))
        return state

    monkeypatch.setattr(stage_module, "digital_state_dict", recording)
    settings = dict(epochs=3, patience=3, val_repeats=1, checkpoint_dir=None, lr_analog=0.05, val_t_inference=None,
                    batch_size=16,
                    val_data=(data[0][:64], data[1][:64]))
    finetune = hetcomp.LAFT(**{**settings, **laft})
    compiled = hetcomp.compile(model, target_set, data=(data[0][64:], data[1][64:]), strategy=strategy,
                               finetune=finetune, hessian={"probes": 2, "max_iter": 3})
    return compiled, record


def _check_carried_back(compiled, record, x):
    """Every state LAFT carried back computes, as the digital graph, the ideal output of the lowered module."""
    for lowered, state in record:
        digital = copy.deepcopy(compiled.graph)
        digital.load_state_dict(state)
        with torch.no_grad(), tier_sim.ideal():
            torch.testing.assert_close(lowered.eval()(x), digital(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tier", ["sram", "photonic"])
def test_laft_fine_tunes_crossbar_and_photonic_layers(monkeypatch, tier):
    model, data = _task()
    compiled, record = _laft_with_record(monkeypatch, model, data, f"{tier}+digital", "all-analog")
    log = compiled.manifest.extra["finetune"]
    assert log["complete"] and set(log["order"]) == {"conv", "fc1", "fc2"}
    assert compiled.manifest.finetuned
    assert log["stages"][-1]["best_val"] > log["stages"][0]["start_val"]  # it learned something
    trained = compiled.graph.state_dict()
    for name, value in model.state_dict().items():
        assert not torch.equal(trained[name], value), name  # every layer's weights and biases moved
    _check_carried_back(compiled, record, data[0][:32])
    # the compiled model re-lowers the carried-back weights to the very layer LAFT validated (eval: weights at the
    # learned steps, inputs per call): the validation-best module, found among the recorded ones by its state
    best = [lowered for lowered, state in record if all(torch.equal(state[k], v) for k, v in trained.items())]
    assert best
    with torch.no_grad():
        torch.manual_seed(2)
        expected = best[-1].eval()(data[0][:32])
        torch.manual_seed(2)
        assert torch.equal(compiled.module(data[0][:32]), expected)


def test_laft_fine_tunes_row_split_layers(monkeypatch):
    """equal-split over SRAM, photonic and digital: every layer is a RowSplit of three parts, and LAFT trains
    every part's rows; the carried-back weights are the parts' rows put back in order."""
    model, data = _task()
    compiled, record = _laft_with_record(monkeypatch, model, data, "sram+photonic+digital", "equal-split")
    assignments = {a.layer.name: a.assignment for _, a in mappable_nodes(compiled.graph)}
    assert all(isinstance(assignment, dict) and len(assignment) == 3 for assignment in assignments.values())
    log = compiled.manifest.extra["finetune"]
    assert log["complete"] and set(log["order"]) == {"conv", "fc1", "fc2"}
    trained = compiled.graph.state_dict()
    for _, annotation in mappable_nodes(compiled.graph):
        name = annotation.layer.module_name
        moved = (trained[f"{name}.weight"] != model.state_dict()[f"{name}.weight"]).flatten(1).any(1)
        tiers = set(annotation.row_targets)
        assert tiers == {"sram", "photonic", "digital"}
        for tier in tiers:  # every tier's rows changed
            rows = [r for r, t in enumerate(annotation.row_targets) if t == tier]
            assert moved[rows].any(), (name, tier)
    _check_carried_back(compiled, record, data[0][:32])


def test_step_init_lsq_sets_lsqs_initial_steps_and_a_bad_value_is_refused():
    torch.manual_seed(0)
    layer, x = nn.Linear(40, 6), torch.rand(16, 40)
    core = PHOTONIC.lower(layer, _target("photonic", step_init="lsq", input_noise_rel=0.0)).train()
    core(x)
    levels = 31  # 6-bit operands
    assert core.input_step.item() == pytest.approx((2 * x.abs().mean() / math.sqrt(levels)).item())
    # LSQ's weight init (2 mean|W| / sqrt(Qp)) is above max|W| / Qp here: held at that cap
    lsq_weight = (2 * layer.weight.abs().mean() / math.sqrt(levels)).item()
    cap = (layer.weight.abs().max() / levels).item()
    assert lsq_weight > cap and core.weight_step.item() == pytest.approx(cap)
    with pytest.raises(hetcomp.errors.ConfigError, match="step_init must be one of"):
        PIM.lower(layer, _target("sram", step_init="zeros"))


def test_mac_greedy_retrains_crossbar_layers():
    """mac-greedy's candidates train through the PIM crossbar (LSQ): accepted layers come back with new weights."""
    model, data = _task()
    finetune = hetcomp.LAFT(epochs=2, patience=2, val_repeats=1, checkpoint_dir=None, lr_analog=0.05,
                            val_t_inference=None, batch_size=16, val_data=(data[0][:64], data[1][:64]))
    compiled = hetcomp.compile(model, "sram+digital", data=(data[0][64:192], data[1][64:192]),
                               strategy=hetcomp.strategies.mac_greedy(threshold=0.99, eval_repeats=1),
                               finetune=finetune)
    log = compiled.manifest.extra["finetune"]
    assert log["accepted"] == ["fc1", "conv", "fc2"]  # by MACs; a threshold of 0.99 accepts every candidate
    assert any(trial["best_epoch"] > 0 for trial in log["trials"])
    trained = compiled.graph.state_dict()
    assert any(not torch.equal(trained[name], value) for name, value in model.state_dict().items())
