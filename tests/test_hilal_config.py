"""The PCM target's aihwkit configuration is HILAL's (its ``gen_rpu_config``), and what that configuration adds —
column-wise weight scaling and learned column-wise output scales — is carried through lowering, LAFT's optimizer,
the digital read-back and the repeat-vectorized forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp.lower.aihwkit_repeats import Realizations, RepeatedAnalogLayer, capture_realization, layout
from hetcomp.lower.aihwkit_sim import DEFAULTS, SIMULATOR, lower_module, rpu_config
from hetcomp.targets import Precision

PCM = hetcomp.targets.get("pcm")
# No read noise and no converters: a lowered layer then computes what its digital weights compute.
IDEAL = dataclasses.replace(PCM, name="pcm-ideal-hilal", precision=Precision(None, None, None),
                            device={**PCM.device, "out_noise": 0.0})
QUIET = dataclasses.replace(PCM, name="pcm-quiet-hilal", device={**PCM.device, "out_noise": 0.0})


def hilal_gen_rpu_config():
    """HILAL's HILAL/models/common/gen_rpu_config.py, setting by setting (with aihwkit's current enum path)."""
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
    from aihwkit.simulator.configs import InferenceRPUConfig
    from aihwkit.simulator.parameters.enums import WeightClipType, WeightModifierType, WeightRemapType
    from aihwkit.simulator.presets.utils import IOParameters

    config = InferenceRPUConfig()
    config.mapping.digital_bias = True
    config.mapping.weight_scaling_omega = 1.0
    config.mapping.weight_scaling_columnwise = True
    config.mapping.learn_out_scaling = True
    config.mapping.out_scaling_columnwise = True
    config.mapping.max_input_size = 256
    config.mapping.max_output_size = 255
    config.noise_model = PCMLikeNoiseModel(g_max=25.0)
    config.remap.type = WeightRemapType.LAYERWISE_SYMMETRIC
    config.clip.type = WeightClipType.LAYER_GAUSSIAN
    config.clip.sigma = 2.0
    config.modifier.type = WeightModifierType.ADD_NORMAL
    config.modifier.rel_to_actual_wmax = True
    config.modifier.std_dev = 0.08
    config.forward = IOParameters()
    config.forward.out_noise = 0.06
    config.forward.inp_res = 1 / (2**8 - 2)
    config.forward.out_res = 1 / (2**8 - 2)
    config.drift_compensation = GlobalDriftCompensation()
    return config


def _differences(ours, theirs, path: str = "config") -> list[str]:
    """Every leaf field that differs (dataclasses walked; noise model and compensation compared by class and
    their attributes)."""
    if dataclasses.is_dataclass(ours) and not isinstance(ours, type):
        out = []
        for field in dataclasses.fields(ours):
            out += _differences(getattr(ours, field.name), getattr(theirs, field.name, "<missing>"),
                                f"{path}.{field.name}")
        return out
    if hasattr(ours, "__dict__") and not isinstance(ours, type) and type(ours).__module__.startswith("aihwkit"):
        if type(ours) is not type(theirs):
            return [f"{path}: {type(ours).__name__} vs {type(theirs).__name__}"]
        out = []
        for key, value in vars(ours).items():
            out += _differences(value, vars(theirs).get(key, "<missing>"), f"{path}.{key}")
        return out
    return [] if ours == theirs else [f"{path}: {ours!r} vs {theirs!r}"]


def test_pcm_configuration_is_hilals_except_the_tile_class():
    cpp = dataclasses.replace(PCM, name="pcm-cpp", device={**PCM.device, "tile": "cpp"})
    assert _differences(rpu_config(cpp), hilal_gen_rpu_config()) == []
    # The default tile is aihwkit's torch tile: a subclass of HILAL's InferenceRPUConfig whose only differences
    # are the tile classes (the documented deviation).
    torch_tile = _differences(rpu_config(PCM), hilal_gen_rpu_config())
    assert torch_tile and all(line.startswith(("config.tile_class", "config.simulator_tile_class"))
                              for line in torch_tile), torch_tile
    # the comparison can fail: the former defaults differ in exactly the four mapping settings
    former = dataclasses.replace(cpp, name="pcm-former", device={
        **cpp.device, "weight_scaling_columnwise": False, "learn_out_scaling": False,
        "out_scaling_columnwise": False, "max_output_size": 256})
    assert sorted(line.split(":")[0] for line in _differences(rpu_config(former), hilal_gen_rpu_config())) == [
        "config.mapping.learn_out_scaling", "config.mapping.max_output_size", "config.mapping.out_scaling_columnwise",
        "config.mapping.weight_scaling_columnwise"]
    assert DEFAULTS["max_output_size"] == 255 and DEFAULTS["weight_scaling_columnwise"]


LAYERS = {
    "linear, 2x3 tiles": (lambda: nn.Linear(300, 600), (8, 300)),
    "conv2d, two input tiles": (lambda: nn.Conv2d(40, 12, 3, padding=1), (2, 40, 6, 6)),
    "depthwise conv": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=8), (2, 8, 5, 5)),
}


def _tiles(layer: nn.Module) -> list:
    return [site.tile for site in layout(layer).sites]


def _scramble_scales(layer: nn.Module, generator: torch.Generator) -> None:
    """Learned output scales far from 1, different per column and tile (what LAFT's training can leave)."""
    for tile in _tiles(layer):
        assert tile.out_scaling_alpha is not None and tile.out_scaling_alpha.numel() == tile.out_size
        with torch.no_grad():
            tile.out_scaling_alpha.copy_(0.5 + 1.5 * torch.rand(tile.out_size, generator=generator))


def _digital(layer: nn.Module, reference: nn.Module) -> nn.Module:
    weight, bias = SIMULATOR.digital_weights(layer)
    digital = type(reference)(**_init_args(reference))
    with torch.no_grad():
        digital.weight.copy_(weight.reshape(digital.weight.shape))
        digital.bias.copy_(bias)
    return digital


def _init_args(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    return {"in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": module.kernel_size, "padding": module.padding, "groups": module.groups}


@pytest.mark.parametrize("name", list(LAYERS))
def test_learned_output_scales_carry_back_to_the_digital_weights(name):
    make, shape = LAYERS[name]
    generator = torch.Generator().manual_seed(3)
    reference = make()
    layer = lower_module(reference, IDEAL).eval()
    x = torch.randn(shape, generator=generator)
    mapping = torch.cat([t.get_mapping_scales().reshape(-1) for t in _tiles(layer)])
    assert mapping.numel() > len(_tiles(layer))  # column-wise mapping scales (one per output of every tile)
    _scramble_scales(layer, generator)
    with torch.no_grad():
        analog = layer(x)
        read_back = _digital(layer, reference)(x)
        unscaled = reference(x)
    torch.testing.assert_close(read_back, analog, rtol=1e-4, atol=1e-4)
    assert (unscaled - analog).abs().max() > 0.1 * analog.abs().max()  # the scales matter: the test can fail

    # one LAFT optimizer step (aihwkit's AnalogSGD: update, clip, remap, which folds learned scales into mapping)
    layer.train()
    optimizer = SIMULATOR.optimizer([{"params": list(layer.parameters()), "lr": 0.05}], lr=0.05, momentum=0.0)
    before = layer.eval()(x).detach()
    layer.train()
    loss = (layer(x) - 2.0 * before).pow(2).mean()
    loss.backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
        read_back = _digital(layer, reference)(x)
    assert (after - before).abs().max() > 1e-3  # the step changed the layer
    torch.testing.assert_close(read_back, after, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(LAYERS))
def test_vectorized_forward_applies_learned_output_scales(name):
    make, shape = LAYERS[name]
    generator = torch.Generator().manual_seed(5)
    layer = lower_module(make(), QUIET).eval()
    _scramble_scales(layer, generator)
    x = torch.randn(shape, generator=generator)
    references, weights, alphas = [], [], []
    for seed in (21, 22):
        torch.manual_seed(seed)
        SIMULATOR.program_and_drift(layer, 86400.0)
        w, a = capture_realization(layer)
        weights.append(w)
        alphas.append(a)
        with torch.no_grad():
            references.append(layer(x))
    repeated = RepeatedAnalogLayer(layer, Realizations(torch.stack(weights), torch.stack(alphas), [1, 2]))
    with torch.no_grad():
        out = repeated(x).view(2, *references[0].shape)
    torch.testing.assert_close(out, torch.stack(references), rtol=1e-5, atol=1e-5)
    # and without the learned scales it would not match (the test can fail)
    for tile in _tiles(layer):
        tile.out_scaling_alpha.data.fill_(1.0)
    with torch.no_grad():
        plain = RepeatedAnalogLayer(layer, Realizations(torch.stack(weights), torch.stack(alphas), [1, 2]))(x)
    assert not torch.allclose(plain.view(out.shape), out, rtol=1e-3, atol=1e-3)
