"""Lowering to aihwkit analog layers (PCM), table-driven like aihwkit's ``convert_to_analog``.

The rpu_config is built from the target's data: ``target.lowering`` (keys in ``DEFAULTS``; a target
overrides any of them) and ``target.precision`` (DAC/ADC bits -> ``inp_res``/``out_res``). Defaults are
HILAL's configuration: PCMLikeNoiseModel(g_max=25), GlobalDriftCompensation, digital bias, 256x256
tiles, weight scaling to max|W| = 1 (omega 1.0, layer-wise), ADD_NORMAL training noise of 0.08 x max|W|,
LAYER_GAUSSIAN clip at 2 sigma, layer-wise symmetric remap, out_noise 0.06, 8-bit input/output.

``tile="torch"`` (default) uses ``TorchInferenceRPUConfig`` (a subclass of ``InferenceRPUConfig`` whose
MVM is plain torch): its noise comes from torch's RNG, so results are reproducible under a seed, and it
runs on CUDA without a CUDA build of aihwkit. ``tile="cpp"`` selects the C++ ``InferenceRPUConfig`` tile
(its forward noise ignores torch's seed).

aihwkit's AnalogConv layers accept ``groups=1`` only, so a grouped or depthwise convolution is lowered
per group: ``GroupedAnalogConv`` holds one analog convolution per group and concatenates their outputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from hetcomp.errors import ConfigError
from hetcomp.targets.base import Target

DEFAULTS: dict[str, Any] = {
    "tile": "torch",
    "g_max": 25.0,
    "drift_compensation": "global",  # "global" | None
    "digital_bias": True,
    "max_input_size": 256,
    "max_output_size": 256,
    # Map max|W| to the full conductance range when lowering (as LAFT's layer-wise remap does after every
    # update): without it, a freshly lowered layer has a worse signal-to-output-noise ratio than a trained one.
    "weight_scaling_omega": 1.0,
    "weight_scaling_columnwise": False,
    "training_noise": "add_normal",  # aihwkit WeightModifierType name
    "training_noise_rel": 0.08,  # std relative to max|W| (HILAL's gamma)
    "clip": "layer_gaussian",  # aihwkit WeightClipType name
    "clip_sigma": 2.0,
    "remap": "layerwise_symmetric",  # aihwkit WeightRemapType name
    "out_noise": 0.06,
}
_NOT_RPU_KEYS = {"simulator"}


def settings(target: Target) -> dict[str, Any]:
    """The target's lowering settings merged over DEFAULTS; unknown keys are an error."""
    given = {k: v for k, v in target.lowering.items() if k not in _NOT_RPU_KEYS}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"target {target.name!r}: unknown aihwkit lowering setting(s) {unknown}; "
                          f"known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


def _resolution(bits: int | None) -> float:
    return -1.0 if bits is None else 1.0 / (2**bits - 2)  # aihwkit: -1 disables quantisation


def rpu_config(target: Target) -> Any:
    """The aihwkit rpu_config for ``target`` (see module docstring)."""
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
    from aihwkit.simulator.configs import InferenceRPUConfig, TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import WeightClipType, WeightModifierType, WeightRemapType

    options = settings(target)
    classes = {"torch": TorchInferenceRPUConfig, "cpp": InferenceRPUConfig}
    if options["tile"] not in classes:
        raise ConfigError(f"target {target.name!r}: tile must be one of {sorted(classes)}, got {options['tile']!r}")
    config = classes[options["tile"]]()
    config.mapping.digital_bias = bool(options["digital_bias"])
    config.mapping.max_input_size = int(options["max_input_size"])
    config.mapping.max_output_size = int(options["max_output_size"])
    config.mapping.weight_scaling_omega = float(options["weight_scaling_omega"])
    config.mapping.weight_scaling_columnwise = bool(options["weight_scaling_columnwise"])
    config.noise_model = PCMLikeNoiseModel(g_max=float(options["g_max"]))
    config.drift_compensation = GlobalDriftCompensation() if options["drift_compensation"] == "global" else None
    config.modifier.type = _enum(WeightModifierType, options["training_noise"], target)
    config.modifier.std_dev = float(options["training_noise_rel"])
    config.modifier.rel_to_actual_wmax = True
    config.clip.type = _enum(WeightClipType, options["clip"], target)
    config.clip.sigma = float(options["clip_sigma"])
    config.remap.type = _enum(WeightRemapType, options["remap"], target)
    config.forward.out_noise = float(options["out_noise"])
    config.forward.inp_res = _resolution(target.precision.input_bits)
    config.forward.out_res = _resolution(target.precision.output_bits)
    return config


def _enum(enum: Any, name: str, target: Target) -> Any:
    try:
        return enum[str(name).upper()]
    except KeyError:
        raise ConfigError(f"target {target.name!r}: {name!r} is not an aihwkit {enum.__name__}; "
                          f"known: {[m.lower() for m in enum.__members__]}") from None


class GroupedAnalogConv(nn.Module):
    """A grouped/depthwise convolution as one aihwkit analog convolution per group (aihwkit runs groups=1 only)."""

    def __init__(self, convs: list[nn.Module], groups: int, template: nn.Module) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.groups = groups
        self.template = {"in_channels": template.in_channels, "out_channels": template.out_channels,
                         "kernel_size": template.kernel_size, "stride": template.stride,
                         "padding": template.padding, "dilation": template.dilation,
                         "padding_mode": template.padding_mode, "bias": template.bias is not None,
                         "dims": 1 if isinstance(template, nn.Conv1d) else 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(self.groups, dim=1)
        return torch.cat([conv(chunk) for conv, chunk in zip(self.convs, chunks, strict=True)], dim=1)

    def get_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Digital-equivalent (weight, bias) of the whole grouped convolution."""
        parts = [conv.get_weights() for conv in self.convs]
        weight = torch.cat([w for w, _ in parts], dim=0)
        bias = None if parts[0][1] is None else torch.cat([b for _, b in parts], dim=0)
        return weight, bias


_ANALOG_CLASSES = {nn.Linear: "AnalogLinear", nn.Conv1d: "AnalogConv1d", nn.Conv2d: "AnalogConv2d"}


def lower_module(module: nn.Module, target: Target) -> nn.Module:
    """The aihwkit analog counterpart of a digital Linear/Conv1d/Conv2d (exact class match, as aihwkit)."""
    import aihwkit.nn as analog_nn

    name = _ANALOG_CLASSES.get(type(module))
    if name is None:
        raise ConfigError(f"aihwkit lowering handles {[c.__name__ for c in _ANALOG_CLASSES]}, "
                          f"not {type(module).__name__}; assign this layer to a digital target")
    config = rpu_config(target)
    analog_class = getattr(analog_nn, name)
    device = module.weight.device
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return analog_class.from_digital(module.cpu(), config).to(device)
    convs = []
    out_per_group = module.out_channels // groups
    for group in range(groups):
        part = type(module)(module.in_channels // groups, out_per_group, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
                            padding_mode=module.padding_mode)
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        with torch.no_grad():
            part.weight.copy_(module.weight[rows])
            if module.bias is not None:
                part.bias.copy_(module.bias[rows])
        convs.append(analog_class.from_digital(part.cpu(), config))
    return GroupedAnalogConv(convs, groups, module).to(device)


def digital_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a digital layer needs to compute what the lowered ``module`` was trained to."""
    weight, bias = module.get_weights()
    return weight, bias


def program_and_drift(module: nn.Module, t_inference: float) -> None:
    """Program every analog tile afresh (new programming noise) and drift it to ``t_inference`` seconds.

    Calling program first is what makes repeats independent: aihwkit's drift alone reuses the
    previous programming noise and drift exponents.
    """
    from aihwkit.simulator.tiles.inference import InferenceTileWithPeriphery

    if module.training:
        raise ConfigError("program_and_drift needs the module in eval mode (aihwkit programs only for inference)")
    for tile in module.modules():  # per tile, as aihwkit's layer methods do, so nested containers count once
        if isinstance(tile, InferenceTileWithPeriphery):
            tile.program_weights()
            tile.drift_weights(t_inference)
