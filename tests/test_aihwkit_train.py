"""The batched train-mode forward of hetcomp's PCM layers (hetcomp.lower.aihwkit_train) against aihwkit's own
tile-by-tile forward, and BatchedAnalogSGD's stacked clip and remap against AnalogSGD's per-tile step.

With the training and forward noise off, both paths compute the same function: outputs and every gradient (input,
tile weights, learned output scales, bias) must agree to float rounding, on tile arrays of equal and unequal tiles,
grouped convolutions, a single tile, with iterative bound management taking effect and with an all-zero tile input.
With noise on, the draws must have aihwkit's distribution (per-tile weight noise relative to that tile's max|W|).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from aihwkit.optim import AnalogSGD
from aihwkit.simulator.parameters.enums import BoundManagementType

import hetcomp
from hetcomp.lower.aihwkit_layers import BatchedAnalogConv2d, BatchedAnalogLinear
from hetcomp.lower.aihwkit_optim import BatchedAnalogSGD
from hetcomp.lower.aihwkit_sim import GroupedAnalogConv, lower_module
from hetcomp.lower.aihwkit_train import unsupported

PCM = hetcomp.targets.get("pcm")
# The training weight noise and the output noise off: both forwards are then deterministic.
QUIET = dataclasses.replace(PCM, device={**PCM.device, "out_noise": 0.0, "training_noise_rel": 0.0})


def aihwkit_path(layer: nn.Module, digital: nn.Module, target=QUIET) -> nn.Module:
    """``digital`` lowered again with ``layer``'s state, running aihwkit's tile-by-tile train forward (the reference;
    lowered afresh rather than copied: a deep copy loses the weight-gradient hooks aihwkit registers)."""
    reference = lower_module(digital, target).train()
    reference.load_state_dict(layer.state_dict())
    from hetcomp.lower.aihwkit_train import _plan

    _plan(reference).reason = "reference: aihwkit's forward"  # the layer's kept check: keep aihwkit's forward
    return reference


def forward_backward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """The output and the gradients of the input and of every parameter (None: no gradient)."""
    inputs = x.clone().requires_grad_()
    out = layer(inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), {"input": inputs.grad, **{name: p.grad for name, p in layer.named_parameters()}}


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs) and len(ours) >= 4  # input, weights, learned scales, bias
    for name, aihwkit in theirs.items():
        if "analog_ctx" in name:
            continue
        mine = ours[name]
        assert mine is not None, name
        torch.testing.assert_close(mine, torch.zeros_like(mine) if aihwkit is None else aihwkit,
                                   rtol=1e-4, atol=1e-5, msg=name)


def batched_call_count(layer: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> int:
    import hetcomp.lower.aihwkit_train as train

    calls = []
    real = train.train_forward
    monkeypatch.setattr(train, "train_forward", lambda *a: calls.append(1) or real(*a))
    import hetcomp.lower.aihwkit_layers as layers
    import hetcomp.lower.aihwkit_sim as sim

    monkeypatch.setattr(layers, "train_forward", train.train_forward)
    monkeypatch.setattr(sim, "train_forward", train.train_forward)
    layer(x)
    return len(calls)


CASES = {
    # name: (digital layer, input shape, expected class, tiles)
    "conv, 2 equal tiles (288 inputs)": (lambda: nn.Conv2d(32, 16, 3, padding=1, stride=2), (3, 32, 7, 7),
                                         BatchedAnalogConv2d, 2),
    "linear, unequal tiles (301 inputs x 300 outputs: 2 x 2)": (lambda: nn.Linear(301, 300), (5, 301),
                                                                 BatchedAnalogLinear, 4),
    "linear, one tile, 3-d input": (lambda: nn.Linear(20, 7), (2, 3, 20), BatchedAnalogLinear, 1),
    "grouped conv, 4 groups": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 6, 6),
                               GroupedAnalogConv, 4),
    "conv1d": (lambda: nn.Conv1d(6, 5, 3), (2, 6, 9), GroupedAnalogConv, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_batched_forward_equals_aihwkits_tile_by_tile(name, monkeypatch):
    make, shape, expected_class, tiles = CASES[name]
    torch.manual_seed(0)
    digital = make()
    layer = lower_module(digital, QUIET).train()
    assert type(layer) is expected_class and unsupported(layer) is None
    assert sum(1 for m in layer.modules() if type(m).__name__ == "TorchInferenceTile") == tiles
    x = torch.randn(*shape)
    reference = aihwkit_path(layer, digital)
    assert batched_call_count(layer, x, monkeypatch) == 1  # the batched path ran, once for all tiles
    assert batched_call_count(reference, x, monkeypatch) == 0
    ours, ours_grads = forward_backward(layer, x)
    theirs, theirs_grads = forward_backward(reference, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert all(theirs_grads[name] is not None for name in theirs_grads if "analog_ctx" not in name)
    assert_same_gradients(ours_grads, theirs_grads)


def test_bound_management_and_all_zero_tiles_as_aihwkit(monkeypatch):
    """Positive inputs through positive weights clip the ADC: aihwkit reruns such a tile at half the input scale
    (tested per tile); a tile whose input block is all zero returns zeros."""
    torch.manual_seed(1)
    linear = nn.Linear(512, 40)
    with torch.no_grad():
        linear.weight.uniform_(0.5, 1.0)
    layer = lower_module(linear, QUIET).train()
    x = torch.rand(6, 512)
    x[:, 256:] = 0.0  # the second input tile sees only zeros
    ours, ours_grads = forward_backward(layer, x)
    theirs, theirs_grads = forward_backward(aihwkit_path(layer, linear), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The one difference: aihwkit's all-zero tile call leaves its weights without a gradient, here a zero one.
    zero_tile = "analog_module.array.1.0.tile.weight"
    assert theirs_grads[zero_tile] is None and torch.equal(ours_grads[zero_tile], torch.zeros(40, 256))
    assert_same_gradients(ours_grads, theirs_grads)
    # Bound management took effect: without it the same layer saturates at the ADC bound.
    unmanaged = lower_module(linear, QUIET).train()  # lowered afresh: a loaded state would share layer's rpu_config
    for module in unmanaged.modules():
        if hasattr(module, "rpu_config"):
            module.rpu_config.forward.bound_management = BoundManagementType.NONE
    saturated = unmanaged(x).detach()
    assert (ours - saturated).abs().max() > 1.0
    # The all-zero tile contributed nothing: the layer equals its first tile plus the bias.
    first_only = x.clone()
    first_only[:, 256:] = 0
    torch.testing.assert_close(ours, layer(first_only).detach(), rtol=0, atol=0)


def test_training_noise_has_aihwkits_distribution():
    """ADD_NORMAL weight noise is drawn per tile with std = 0.08 x that tile's own max|W|: one-hot input rows read
    the noisy weights' columns back (no quantization, no output noise, no bound)."""
    from hetcomp.targets import Precision

    target = dataclasses.replace(PCM, precision=Precision(None, None, None),
                                 device={**PCM.device, "out_noise": 0.0, "out_bound": 0.0})
    torch.manual_seed(2)
    layer = lower_module(nn.Linear(400, 200, bias=False), target).train()
    tiles = [t for t in layer.modules() if type(t).__name__ == "TorchInferenceTile"]
    assert len(tiles) == 2  # 400 inputs: two tiles of 200
    with torch.no_grad():
        tiles[1].tile.weight.mul_(0.25)  # the second tile's max|W| is a quarter of the first's
        for tile in tiles:
            tile.set_mapping_scales(torch.ones(200))
            tile.out_scaling_alpha.fill_(1.0)
    eye = torch.eye(400)
    clean = torch.cat([tiles[0].tile.weight, tiles[1].tile.weight], dim=1).detach().T  # rows: input k's weights
    with torch.no_grad():
        noise = layer(eye) - clean  # [400, 200]
    for index, tile in enumerate(tiles):
        block = noise[index * 200:(index + 1) * 200]
        expected = 0.08 * tile.tile.weight.abs().max().item()
        assert abs(block.std().item() / expected - 1) < 0.03, (index, block.std().item(), expected)
        assert abs(block.mean().item()) < 0.03 * expected
    # Fresh draws each call, reproducible under the seed.
    torch.manual_seed(3)
    first = layer(eye[:4]).detach()
    torch.manual_seed(3)
    assert torch.equal(first, layer(eye[:4]).detach())
    assert not torch.equal(first, layer(eye[:4]).detach())


def test_batched_sgd_equals_analog_sgd():
    """Five LAFT-like steps (clip at 2 sigma, layer-wise remap, learned output scales, momentum): BatchedAnalogSGD's
    stacked post-update leaves the same weights, scales and gradient hooks as AnalogSGD's per-tile one."""
    torch.manual_seed(4)
    digital = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 16, 3), nn.Flatten(),
                            nn.Linear(16 * 16 * 16, 10))

    def lowered() -> nn.Sequential:  # lowered twice rather than deep-copied (a copy loses aihwkit's gradient hooks)
        model = copy.deepcopy(digital)
        for index in (0, 2, 4):
            model[index] = lower_module(digital[index], QUIET)
        return model

    models = {"ours": lowered(), "aihwkit": lowered()}
    optimizers = {"ours": BatchedAnalogSGD(models["ours"].parameters(), lr=0.05, momentum=0.85),
                  "aihwkit": AnalogSGD(models["aihwkit"].parameters(), lr=0.05, momentum=0.85)}
    x, labels = torch.randn(4, 3, 20, 20), torch.randint(0, 10, (4,))
    for _ in range(5):
        for name in models:
            optimizers[name].zero_grad()
            nn.functional.cross_entropy(models[name].train()(x), labels).backward()
            optimizers[name].step()

    def state(model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        tiles = {f"{name}.mapping_scales": module.mapping_scales for name, module in model.named_modules()
                 if hasattr(module, "mapping_scales")}
        return {name: value.detach().clone() for name, value in {**tensors, **tiles}.items()
                if value is not None and "analog_ctx" not in name}

    ours, theirs, start = state(models["ours"]), state(models["aihwkit"]), state(lowered())
    assert set(ours) == set(theirs) and len(ours) > 10
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key].expand_as(ours[key]), rtol=1e-4, atol=1e-6, msg=key)
    assert sum(not torch.equal(ours[key], start[key]) for key in ours) > 10  # the steps did change the model
    scales = [t.get_scales() for t in models["ours"].modules() if hasattr(t, "mapping_scales")]
    assert scales and all(s is not None for s in scales)
    learned = [t.out_scaling_alpha for t in models["ours"].modules() if type(t).__name__ == "TorchInferenceTile"]
    assert all(torch.equal(a, torch.ones_like(a)) for a in learned)  # reset by every remap
    weights = [t.tile.weight for t in models["ours"].modules() if type(t).__name__ == "TorchInferenceTile"]
    assert all(w.abs().max().item() == pytest.approx(1.0) for w in weights)  # remapped to max|W| = 1


def test_settings_the_batched_forward_does_not_reproduce_keep_aihwkits(monkeypatch):
    """A C++ tile, or stochastic input rounding, is named by ``unsupported`` and trains through aihwkit's forward."""
    torch.manual_seed(5)
    cpp = lower_module(nn.Linear(12, 5), dataclasses.replace(QUIET, device={**QUIET.device, "tile": "cpp"})).train()
    assert "tile class" in unsupported(cpp)
    assert batched_call_count(cpp, torch.randn(3, 12), monkeypatch) == 0
    stochastic = lower_module(nn.Linear(12, 5), QUIET).train()
    for module in stochastic.modules():
        if hasattr(module, "rpu_config"):
            module.rpu_config.forward.inp_sto_round = True
    assert "rounding" in unsupported(stochastic)
    assert batched_call_count(stochastic, torch.randn(3, 12), monkeypatch) == 0
    assert stochastic(torch.randn(3, 12)).shape == (3, 5)


FORWARD_VARIANTS = {
    # name: IOParameters changes (aihwkit's own forward must give the same function)
    "255 DAC levels (the row maximum rounds above the input bound)": {"inp_res": 1 / 255},
    "signed-max noise management": {"noise_management": "MAX"},
    "constant noise management, no bound management": {"noise_management": "CONSTANT", "nm_thres": 2.0,
                                                       "bound_management": "NONE"},
    "abs-max with a threshold": {"nm_thres": 0.5},
}


@pytest.mark.parametrize("name", list(FORWARD_VARIANTS))
def test_forward_settings_as_aihwkit(name):
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

    torch.manual_seed(6)
    digital = nn.Linear(300, 20)
    layer = lower_module(digital, QUIET).train()
    for module in layer.modules():
        if hasattr(module, "rpu_config"):
            for key, value in FORWARD_VARIANTS[name].items():
                enum = {"noise_management": NoiseManagementType, "bound_management": BoundManagementType}.get(key)
                setattr(module.rpu_config.forward, key, enum[value] if enum else value)
    assert unsupported(layer) is None
    x = torch.randn(7, 300) * 3
    ours, ours_grads = forward_backward(layer, x)
    theirs, theirs_grads = forward_backward(aihwkit_path(layer, digital), x)  # shares layer's rpu_configs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert_same_gradients(ours_grads, theirs_grads)


def test_the_support_check_follows_a_loaded_rpu_config():
    """aihwkit's load_state_dict replaces the tiles' rpu_config: the batched forward's check is made again."""
    from hetcomp.lower.aihwkit_train import batched_training

    layer = lower_module(nn.Linear(12, 5), QUIET).train()
    assert batched_training(layer)
    other = lower_module(nn.Linear(12, 5), QUIET)
    for module in other.modules():
        if hasattr(module, "rpu_config"):
            module.rpu_config.forward.out_sto_round = True
    layer.load_state_dict(other.state_dict())
    assert not batched_training(layer) and "rounding" in unsupported(layer)


def test_batched_sgd_stays_batched_after_a_copy_and_a_load(monkeypatch):
    """aihwkit rebuilds a tile's analog context on copy and load (its use_torch_update flag reset): the torch tiles
    still take the stacked post-update."""
    import hetcomp.lower.aihwkit_optim as optim

    calls = []
    real = optim.post_update
    monkeypatch.setattr(optim, "post_update", lambda tiles: calls.append(len(tiles)) or real(tiles))
    model = copy.deepcopy(lower_module(nn.Linear(300, 8), QUIET))
    model.load_state_dict(lower_module(nn.Linear(300, 8), QUIET).state_dict())
    optimizer = BatchedAnalogSGD(model.parameters(), lr=0.1)
    model.train()(torch.randn(4, 300)).sum().backward()
    optimizer.step()
    assert calls == [2]


def test_an_unbounded_adc_with_output_bits_is_refused_before_lowering():
    bad = dataclasses.replace(PCM, device={**PCM.device, "out_bound": 0.0})
    from hetcomp.errors import ConfigError
    from hetcomp.lower.aihwkit_sim import SIMULATOR

    with pytest.raises(ConfigError, match="unbounded ADC"):
        SIMULATOR.check(bad)
