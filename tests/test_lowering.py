"""Lowering to aihwkit (exactly the assigned layers become analog; digital layers untouched; grouped
convolutions per group) and the repeat evaluation (independent, reproducible repeats)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn as nn
from aihwkit.nn import AnalogConv2d, AnalogLinear
from aihwkit.simulator.tiles.inference import InferenceTileWithPeriphery

import hetcomp
from hetcomp.errors import ConfigError
from hetcomp.evaluate import evaluate, plain_loop_accuracy
from hetcomp.lower import digital_state_dict, lower_graph
from hetcomp.lower.aihwkit_layers import BatchedAnalogConv2d, BatchedAnalogLinear
from hetcomp.lower.aihwkit_sim import GroupedAnalogConv, lower_module, rpu_config
from hetcomp.lower.patches import conv_patches
from hetcomp.targets import Precision

PCM = hetcomp.targets.get("pcm")
# PCM without read noise or converters: an analog layer must then compute what its digital layer does.
IDEAL_PCM = dataclasses.replace(PCM, name="ideal-pcm", precision=Precision(None, None, None),
                                device={**PCM.device, "out_noise": 0.0})


def compiled_digits(digits_model, strategy):
    model, data = digits_model
    x = next(iter(data["test"]))[0]
    return hetcomp.compile(model, "pcm+digital", (x,), strategy=strategy), x


def test_exactly_the_assigned_layers_become_analog(digits_model):
    model, _ = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled, x = compiled_digits(digits_model, "first-last-digital")
    lowered = compiled.module
    expected = {"conv1": nn.Conv2d, "conv2": BatchedAnalogConv2d, "conv3": GroupedAnalogConv,
                "conv4": BatchedAnalogConv2d, "fc1": BatchedAnalogLinear, "fc2": nn.Linear}  # the patches: see below
    for name, cls in expected.items():
        assert type(lowered.get_submodule(name)) is cls, name
    assert {k: v["simulator"] for k, v in compiled.lowering.items()} == {
        "conv1": None, "conv2": "aihwkit", "conv3": "aihwkit", "conv4": "aihwkit", "fc1": "aihwkit", "fc2": None}
    # digital layers compute exactly what the model's layers compute
    probe_conv, probe_fc = torch.randn(3, 1, 8, 8), torch.randn(3, 64)
    torch.testing.assert_close(lowered.conv1(probe_conv), model.conv1(probe_conv), rtol=0, atol=0)
    torch.testing.assert_close(lowered.fc2(probe_fc), model.fc2(probe_fc), rtol=0, atol=0)
    # the digital graph and the caller's model are untouched by lowering
    torch.testing.assert_close(compiled.graph(x), model(x), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, AnalogConv2d | AnalogLinear) for m in model.modules())
    # and the lowered model is noisy (eval mode still has read noise and converters)
    assert not torch.equal(compiled(x), model(x))


@pytest.mark.parametrize("groups, in_channels, out_channels, conv_class, stride",
                         [(4, 4, 8, nn.Conv2d, 1), (6, 6, 6, nn.Conv2d, 2), (2, 4, 6, nn.Conv1d, 1),
                          (1, 4, 6, nn.Conv1d, 2)])  # any Conv1d: aihwkit's AnalogConv1d needs indexed tiles
def test_grouped_and_depthwise_convs_lower_per_group(groups, in_channels, out_channels, conv_class, stride):
    torch.manual_seed(1)
    conv = conv_class(in_channels, out_channels, 3, padding=1, groups=groups, stride=stride)
    lowered = lower_module(conv, IDEAL_PCM).eval()
    assert isinstance(lowered, GroupedAnalogConv) and len(lowered.tiles) == groups
    patch = in_channels // groups * 3 * (3 if conv_class is nn.Conv2d else 1)  # one tile per group's patches
    assert all(type(t) is AnalogLinear and t.in_features == patch for t in lowered.tiles)
    x = torch.randn(2, in_channels, 7, 7) if conv_class is nn.Conv2d else torch.randn(2, in_channels, 9)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), conv(x), rtol=1e-4, atol=1e-4)
    weight, bias = lowered.get_weights()
    torch.testing.assert_close(weight.reshape(conv.weight.shape), conv.weight.detach())
    torch.testing.assert_close(bias, conv.bias.detach())


@pytest.mark.parametrize("kernel, stride, padding, dilation, size",
                         [((3, 3), (1, 1), (1, 1), (1, 1), (7, 7)), ((1, 1), (2, 2), (0, 0), (1, 1), (8, 8)),
                          ((2, 3), (1, 2), (2, 1), (2, 1), (9, 6)), ((3, 3), (2, 1), (0, 2), (2, 2), (10, 11))])
def test_conv_patches_are_unfolds_columns_with_the_same_gradient(kernel, stride, padding, dilation, size):
    torch.manual_seed(0)
    x = torch.randn(3, 5, *size, dtype=torch.float64, requires_grad=True)
    reference = nn.functional.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)  # [N, L, C*k]
    patches = conv_patches(x, kernel, stride, padding, dilation)
    out_h = (size[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    assert patches.shape == (3, out_h, reference.shape[1] // out_h, reference.shape[2])
    assert torch.equal(patches.flatten(1, 2), reference)
    weights = torch.randn_like(reference)
    (expected,) = torch.autograd.grad((reference * weights).sum(), x)
    (got,) = torch.autograd.grad((patches.flatten(1, 2) * weights).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_hetcomps_analog_conv2d_evaluates_exactly_as_aihwkits(monkeypatch):
    """In eval mode hetcomp's AnalogConv2d differs from aihwkit's only in how it forms the patches: with the 8-bit
    periphery, output noise and a tile array of 288 inputs the same seed gives the same outputs bit for bit and the
    same gradients. (Its train mode runs the tiles batched: tests/test_aihwkit_train.py.)"""
    from aihwkit.nn import AnalogConv2d as AihwkitConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 3, padding=1, stride=2)
    ours = lower_module(conv, PCM).eval()
    theirs = AihwkitConv2d.from_digital(conv, rpu_config(PCM)).eval()
    assert type(ours) is not AihwkitConv2d and isinstance(ours, AihwkitConv2d)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 32, 9, 9)
    outputs, gradients = [], []
    import aihwkit.nn.modules.conv as aihwkit_conv

    real_unfold = aihwkit_conv.unfold
    for layer in (ours, theirs):
        inputs = x.clone().requires_grad_()
        torch.manual_seed(7)
        if layer is ours:  # ours must not reach aihwkit's unfold path
            monkeypatch.setattr(aihwkit_conv, "unfold", lambda *_, **__: pytest.fail("F.unfold was called"))
        out = layer(inputs)
        monkeypatch.setattr(aihwkit_conv, "unfold", real_unfold)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        outputs.append(out)
        gradients.append([inputs.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
    assert outputs[0].shape == (4, 16, 5, 5) and outputs[0].stride() == outputs[1].stride()
    assert torch.equal(outputs[0], outputs[1])
    assert len(gradients[0]) == len(gradients[1]) > 1
    for ours_grad, theirs_grad in zip(*gradients):
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-6)


def test_digital_state_round_trips_through_lowering(digits_model):
    compiled, x = compiled_digits(digits_model, "all-analog")
    lowered, report = lower_graph(compiled.graph, compiled.targets)
    state = digital_state_dict(lowered, report)
    assert set(state) == set(compiled.graph.state_dict())
    for key, value in compiled.graph.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)


def test_lowering_errors_name_the_cause(digits_model):
    compiled, _ = compiled_digits(digits_model, "first-last-digital")
    layer = next(a for _, a in hetcomp.mappable_nodes(compiled.graph) if a.layer.name == "conv2")
    layer.assignment = {"pcm": 16, "digital": 16}
    with pytest.raises(ConfigError, match="'conv2' is row-split"):
        lower_graph(compiled.graph, compiled.targets)
    odd = dataclasses.replace(PCM, name="odd-pcm", device={**PCM.device, "gmax": 10})
    with pytest.raises(ConfigError, match="unknown device parameter.*'gmax'.*simulator 'aihwkit'; known"):
        lower_module(nn.Linear(3, 3), odd)


def test_repeats_are_independent_and_reproducible(digits_model, monkeypatch):
    compiled, _ = compiled_digits(digits_model, "all-analog")
    _, data = digits_model
    # What each repeat programmed, recorded as evaluate programs it. Whether two repeats' accuracies coincide
    # (359 test images) depends on the trained weights; two noisy programmings of a tile never coincide.
    evaluate_module = importlib.import_module("hetcomp.evaluate")
    program = evaluate_module.program_and_drift
    programmed = []

    def recording(module, report, t_inference):  # the tile path programs a copy of the module
        program(module, report, t_inference)
        tile = next(m for m in module.modules() if isinstance(m, InferenceTileWithPeriphery))
        programmed.append(tile.programmed_weights.clone())

    monkeypatch.setattr(evaluate_module, "program_and_drift", recording)

    def run(repeats, seed):
        programmed.clear()
        result = compiled.evaluate(data["test"], repeats=repeats, seed=seed, batch_size=data["test"].batch_size,
                                   exact_tiles=True)
        return result, list(programmed)

    first, first_programmed = run(4, seed=1)
    assert len(first_programmed) == 4  # one programming per repeat
    again, again_programmed = run(4, seed=1)  # after the module was programmed and drifted by `first`
    assert first.accuracies == again.accuracies
    assert all(torch.equal(a, b) for a, b in zip(first_programmed, again_programmed, strict=True))
    # repeat r depends only on (seed, r), not on the repeats before it
    two, two_programmed = run(2, seed=1)
    assert two.accuracies == first.accuracies[:2]
    assert all(torch.equal(a, b) for a, b in zip(two_programmed, first_programmed[:2], strict=True))
    # every repeat programs afresh, and another seed programs otherwise
    assert not any(torch.equal(first_programmed[i], first_programmed[j]) for i in range(4) for j in range(i))
    _, other_programmed = run(4, seed=2)
    assert not any(torch.equal(a, b) for a, b in zip(other_programmed, first_programmed, strict=True))
    # the accuracies are those of the reference loop (program, drift, iterate the loader, same seeds), whatever
    # accuracy the trained weights reach
    assert first.accuracies == plain_loop_accuracy(compiled.module, compiled.lowering, data["test"], 4, 86400.0,
                                                   seed=1)
    assert first.mac_ratio == 1.0


def test_each_repeat_reprograms_rather_than_only_redrifting(digits_model):
    compiled, _ = compiled_digits(digits_model, "all-analog")
    module, report = compiled.module.eval(), compiled.lowering
    tile = next(m for m in module.modules() if isinstance(m, InferenceTileWithPeriphery))

    from hetcomp.lower import program_and_drift

    torch.manual_seed(0)
    program_and_drift(module, report, 86400.0)
    programmed0, nu0 = tile.programmed_weights.clone(), [p.clone() for p in tile.drift_noise_parameters]
    torch.manual_seed(1)
    program_and_drift(module, report, 86400.0)
    programmed1, nu1 = tile.programmed_weights.clone(), [p.clone() for p in tile.drift_noise_parameters]
    # fresh programming noise and drift exponents per repeat
    assert not torch.equal(programmed0, programmed1)
    assert not all(torch.equal(a, b) for a, b in zip(nu0, nu1, strict=True))
    # what evaluating with drift alone would do: reuse that programming and those exponents
    torch.manual_seed(2)
    tile.drift_weights(86400.0)
    assert torch.equal(tile.programmed_weights, programmed1)
    assert all(torch.equal(a, b) for a, b in zip(tile.drift_noise_parameters, nu1, strict=True))


def test_prefix_cache_is_exact_and_digital_models_have_no_spread(digits_model):
    compiled, _ = compiled_digits(digits_model, "first-last-digital")  # conv1 (digital) is a cached prefix
    _, data = digits_model
    cached = evaluate(compiled.module, compiled.lowering, data["test"], repeats=3, seed=5)
    uncached = evaluate(compiled.module, compiled.lowering, data["test"], repeats=3, seed=5, prefix_cache_bytes=0)
    assert cached.accuracies == uncached.accuracies
    digital, _ = compiled_digits(digits_model, "all-digital")
    result = digital.evaluate(data["test"], repeats=3)
    assert result.std == 0 and result.mac_ratio == 0
    assert result.mean == pytest.approx(hetcomp.datasets.accuracy(digits_model[0], data["test"]))


def test_streamed_data_and_a_partial_prefix_cache_give_the_same_accuracies(digits_model, monkeypatch):
    """Bounded memory: data larger than stage_bytes is streamed once per repeat, the prefix cache stops
    before the chunk that would exceed its limit (not after computing everything), and neither changes a
    result."""
    import hetcomp.evaluate as evaluation

    compiled, _ = compiled_digits(digits_model, "first-last-digital")
    _, data = digits_model
    test = data["test"]  # 359 images in batches of 128 -> chunks of 32 with batch_size=32: 12 chunks
    reference = evaluate(compiled.module, compiled.lowering, test, repeats=2, seed=5, batch_size=32)
    streamed = evaluate(compiled.module, compiled.lowering, test, repeats=2, seed=5, batch_size=32, stage_bytes=0)
    assert streamed.accuracies == reference.accuracies
    x, y = torch.cat([b[0] for b in test]), torch.cat([b[1] for b in test])
    pair = evaluate(compiled.module, compiled.lowering, (x, y), repeats=2, seed=5, batch_size=32, stage_bytes=1000)
    assert pair.accuracies == reference.accuracies
    source = evaluation.EvaluationData(test, torch.device("cpu"), 32, stage_bytes=0)
    assert source.streamed and sum(len(c[1]) for c in source.chunks()) == 359
    computed = []
    real_prefix = evaluation._prefix_env

    def counting(module, frontier, inputs):
        env = real_prefix(module, frontier, inputs)
        computed.append(evaluation._nbytes(env))
        return env

    monkeypatch.setattr(evaluation, "_prefix_env", counting)
    one_chunk = 32 * 16 * 8 * 8 * 4  # conv1's output for 32 images: the prefix cut by the first analog layer
    limit = int(2.5 * one_chunk)
    partial = evaluate(compiled.module, compiled.lowering, test, repeats=2, seed=5, batch_size=32,
                       prefix_cache_bytes=limit)
    assert computed == [one_chunk, one_chunk]  # the third chunk was never computed: it would not fit
    assert partial.accuracies == reference.accuracies


def test_bad_evaluation_arguments_fail_fast(digits_model):
    compiled, _ = compiled_digits(digits_model, "all-analog")
    with pytest.raises(ConfigError, match="repeats must be an integer >= 1"):
        compiled.evaluate(digits_model[1]["test"], repeats=0)
    with pytest.raises(ConfigError, match=r"t_inference .*must be a finite number >= 0"):
        compiled.evaluate(digits_model[1]["test"], t_inference=-1)
    with pytest.raises(ConfigError, match="evaluation data"):
        compiled.evaluate(42)
