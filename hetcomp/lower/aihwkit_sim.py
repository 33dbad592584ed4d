"""Lowering to aihwkit analog layers (PCM), table-driven like aihwkit's ``convert_to_analog``.

The rpu_config is built from the target's data: ``target.device`` (keys in ``DEFAULTS``; a target
overrides any of them; ``AihwkitSimulator`` at the end of this file is the registered simulator) and
``target.precision`` (DAC/ADC bits -> ``inp_res``/``out_res``). Defaults are
HILAL's configuration (its ``gen_rpu_config``): PCMLikeNoiseModel(g_max=25), GlobalDriftCompensation,
digital bias, tiles of at most 256 inputs x 255 outputs, column-wise weight scaling to max|W| = 1 (omega 1.0)
with learned column-wise output scales, ADD_NORMAL training noise of 0.08 x max|W|, LAYER_GAUSSIAN clip at
2 sigma, layer-wise symmetric remap, out_noise 0.06, 8-bit input/output. The one deviation is the tile class
(``tile="torch"``, below; HILAL uses the C++ tile): bench/hilal_config.py measures it and each setting.

``tile="torch"`` (default) uses ``TorchInferenceRPUConfig`` (a subclass of ``InferenceRPUConfig`` whose
MVM is plain torch): its noise comes from torch's RNG, so results are reproducible under a seed, and it
runs on CUDA without a CUDA build of aihwkit. ``tile="cpp"`` selects the C++ ``InferenceRPUConfig`` tile
(its forward noise ignores torch's seed).

aihwkit's AnalogConv layers accept ``groups=1`` only, so a grouped or depthwise convolution is lowered
per group: ``GroupedAnalogConv`` holds one analog convolution per group and concatenates their outputs.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn as nn

from hetcomp.errors import ConfigError
from hetcomp.lower.aihwkit_train import batched_training, train_forward
from hetcomp.lower.patches import conv_patches
from hetcomp.lower.simulator import Simulator
from hetcomp.targets.base import Target

DEFAULTS: dict[str, Any] = {
    "tile": "torch",
    "g_max": 25.0,
    "drift_compensation": "global",  # "global" | None
    "digital_bias": True,
    "max_input_size": 256,
    "max_output_size": 255,  # HILAL's gen_rpu_config: 255 (a 256-row output block needs two tiles)
    # Map max|W| to the full conductance range when lowering (as LAFT's layer-wise remap does after every
    # update): without it, a freshly lowered layer has a worse signal-to-output-noise ratio than a trained one.
    "weight_scaling_omega": 1.0,
    "weight_scaling_columnwise": True,  # HILAL: each output column's max|W| -> full range, scale in digital
    "learn_out_scaling": True,  # HILAL: a learned digital output scale per column (trained by LAFT)
    "out_scaling_columnwise": True,
    "training_noise": "add_normal",  # aihwkit WeightModifierType name
    "training_noise_rel": 0.08,  # std relative to max|W| (HILAL's gamma)
    "clip": "layer_gaussian",  # aihwkit WeightClipType name
    "clip_sigma": 2.0,
    "remap": "layerwise_symmetric",  # aihwkit WeightRemapType name
    "out_noise": 0.06,
    "out_bound": 12.0,  # ADC range in units of the normalised output; <= 0: unbounded (needs output_bits None)
    # PCM device model knobs (aihwkit PCMLikeNoiseModel scales; 0 switches that effect off) and an extra
    # static Gaussian weight noise at programming, std relative to g_max (the input-curvature
    # paper's "WNoise" non-ideality).
    "prog_noise_scale": 1.0,
    "read_noise_scale": 1.0,
    "drift_scale": 1.0,
    "static_weight_noise": 0.0,
}


def settings(target: Target) -> dict[str, Any]:
    """The target's device parameters merged over DEFAULTS; unknown keys are an error."""
    return SIMULATOR.settings(target)


def _resolution(bits: int | None) -> float:
    return -1.0 if bits is None else 1.0 / (2**bits - 2)  # aihwkit: -1 disables quantisation


def rpu_config(target: Target) -> Any:
    """The aihwkit rpu_config for ``target`` (see module docstring)."""
    from aihwkit.inference import GlobalDriftCompensation
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
    config.mapping.learn_out_scaling = bool(options["learn_out_scaling"])
    config.mapping.out_scaling_columnwise = bool(options["out_scaling_columnwise"])
    config.noise_model = _noise_model(
        static_std=float(options["static_weight_noise"]), g_max=float(options["g_max"]),
        prog_noise_scale=float(options["prog_noise_scale"]), read_noise_scale=float(options["read_noise_scale"]),
        drift_scale=float(options["drift_scale"]))
    config.drift_compensation = GlobalDriftCompensation() if options["drift_compensation"] == "global" else None
    config.modifier.type = _enum(WeightModifierType, options["training_noise"], target)
    config.modifier.std_dev = float(options["training_noise_rel"])
    config.modifier.rel_to_actual_wmax = True
    config.clip.type = _enum(WeightClipType, options["clip"], target)
    config.clip.sigma = float(options["clip_sigma"])
    config.remap.type = _enum(WeightRemapType, options["remap"], target)
    config.forward.out_noise = float(options["out_noise"])
    config.forward.out_bound = float(options["out_bound"])
    config.forward.inp_res = _resolution(target.precision.input_bits)
    config.forward.out_res = _resolution(target.precision.output_bits)
    return config


@functools.cache
def _static_noise_class() -> type:
    """aihwkit's PCMLikeNoiseModel plus static Gaussian weight noise at programming (built once, on first
    use, so that importing hetcomp does not import aihwkit)."""
    from aihwkit.inference import PCMLikeNoiseModel

    class PCMWithStaticNoise(PCMLikeNoiseModel):
        def __init__(self, static_std: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.static_std = static_std

        def apply_programming_noise_to_conductance(self, g_target: torch.Tensor) -> torch.Tensor:
            g_prog = super().apply_programming_noise_to_conductance(g_target)
            noise = torch.randn_like(g_prog) * self.static_std * self.g_max
            return (g_prog + noise).clamp(min=0.0)

    return PCMWithStaticNoise


def _noise_model(static_std: float, **kwargs: Any) -> Any:
    """PCMLikeNoiseModel, with static weight noise (std ``static_std`` x g_max) added when > 0."""
    from aihwkit.inference import PCMLikeNoiseModel

    return _static_noise_class()(static_std, **kwargs) if static_std > 0 else PCMLikeNoiseModel(**kwargs)


def _enum(enum: Any, name: str, target: Target) -> Any:
    try:
        return enum[str(name).upper()]
    except KeyError:
        raise ConfigError(f"target {target.name!r}: {name!r} is not an aihwkit {enum.__name__}; "
                          f"known: {[m.lower() for m in enum.__members__]}") from None


class GroupedAnalogConv(nn.Module):
    """A grouped/depthwise convolution (or any Conv1d) as one aihwkit analog tile per group (aihwkit runs groups=1
    only, and its AnalogConv1d only through the indexed path its torch tiles do not have).

    aihwkit's AnalogConv forward is ``unfold`` + the tile's MVM on the patches; this does the same with
    one ``conv_patches`` for all groups and an ``AnalogLinear`` tile per group on that group's patch columns
    (columns are ordered channel-major, so a group's columns are contiguous). One patch copy instead
    of one per group keeps depthwise layers from dominating evaluation time.
    """

    def __init__(self, tiles: list[nn.Module], conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        self.tiles = nn.ModuleList(tiles)
        self.groups = conv.groups
        self.out_channels = conv.out_channels
        self.one_d = isinstance(conv, nn.Conv1d)

        def two_d(value: tuple[int, ...], fill: int) -> tuple[int, int]:
            return (fill, value[0]) if self.one_d else (value[0], value[1])

        self.kernel_size = two_d(conv.kernel_size, 1)
        self.stride = two_d(conv.stride, 1)
        self.padding = two_d(conv.padding, 0)
        self.dilation = two_d(conv.dilation, 1)
        self.weight_shape = tuple(conv.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_d:
            x = x.unsqueeze(-2)
        patches = conv_patches(x, self.kernel_size, self.stride, self.padding, self.dilation)
        out_h = patches.shape[1]
        patches = patches.flatten(1, 2)  # [N, L, C*k], as unfold(x).transpose(1, 2)
        if batched_training(self):  # all groups' tiles in one call
            out = train_forward(self, patches).transpose(1, 2)
        else:
            columns = patches.shape[-1] // self.groups
            outputs = [tile(patches[..., g * columns : (g + 1) * columns]) for g, tile in enumerate(self.tiles)]
            out = torch.cat(outputs, dim=-1).transpose(1, 2)
        out = out.reshape(x.shape[0], self.out_channels, out_h, -1)
        return out.squeeze(-2) if self.one_d else out

    def get_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Digital-equivalent (weight, bias) of the whole grouped convolution."""
        parts = [tile.get_weights() for tile in self.tiles]
        weight = torch.cat([w for w, _ in parts], dim=0).reshape(self.weight_shape)
        bias = None if parts[0][1] is None else torch.cat([b for _, b in parts], dim=0)
        return weight, bias


_LOWERED = (nn.Linear, nn.Conv1d, nn.Conv2d)  # exact class match, as aihwkit


def lower_module(module: nn.Module, target: Target) -> nn.Module:
    """The aihwkit analog counterpart of a digital Linear/Conv1d/Conv2d (exact class match, as aihwkit)."""
    import aihwkit.nn as analog_nn

    if type(module) not in _LOWERED:
        raise ConfigError(f"aihwkit lowering handles {[c.__name__ for c in _LOWERED]}, "
                          f"not {type(module).__name__}; assign this layer to a digital target")
    config = rpu_config(target)
    device = module.weight.device
    groups = getattr(module, "groups", 1)
    # A Conv1d is lowered as one group of GroupedAnalogConv: aihwkit's AnalogConv1d needs the indexed path, which
    # its torch tiles lack.
    if groups == 1 and type(module) is not nn.Conv1d:
        from hetcomp.lower.aihwkit_layers import BatchedAnalogConv2d, BatchedAnalogLinear

        analog_class = BatchedAnalogLinear if type(module) is nn.Linear else BatchedAnalogConv2d
        # aihwkit builds tiles on the CPU; a copy, so that the graph's own layer is not moved off its device
        return analog_class.from_digital(copy.deepcopy(module).cpu(), config).to(device)
    if getattr(module, "padding_mode", "zeros") != "zeros" or isinstance(module.padding, str):
        raise ConfigError(f"grouped convolution with padding {module.padding!r} / padding_mode "
                          f"{module.padding_mode!r} cannot be lowered per group yet; assign it to a digital target")
    tiles = []
    out_per_group = module.out_channels // groups
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        part = nn.Linear(module.weight[rows][0].numel(), out_per_group, bias=module.bias is not None)
        with torch.no_grad():
            part.weight.copy_(module.weight[rows].reshape(out_per_group, -1))
            if module.bias is not None:
                part.bias.copy_(module.bias[rows])
        tiles.append(analog_nn.AnalogLinear.from_digital(part, config))
    return GroupedAnalogConv(tiles, module).to(device)


class AihwkitSimulator(Simulator):
    """PCM through aihwkit (programming and read noise, drift, drift compensation, periphery): the device
    parameters are ``DEFAULTS``' keys. Trainable: LAFT fine-tunes through aihwkit's analog layers."""

    name = "aihwkit"
    trainable = True
    defaults = DEFAULTS

    def check(self, target: Target) -> None:
        super().check(target)
        for field_name in ("input_bits", "output_bits"):  # aihwkit's resolution is 1 / (2^bits - 2)
            bits = getattr(target.precision, field_name)
            if bits is not None and bits < 2:
                raise ConfigError(f"target {target.name!r}: aihwkit needs precision.{field_name} >= 2 bits or None, "
                                  f"got {bits}")
        if target.precision.output_bits is not None and float(self.settings(target)["out_bound"]) <= 0:
            # aihwkit's quantizer steps are fractions of the bound: an unbounded ADC gives NaN outputs
            raise ConfigError(f"target {target.name!r}: an unbounded ADC (out_bound <= 0) cannot quantize; set "
                              "device out_bound > 0 or precision.output_bits None")

    def optimizer(self, groups: list[dict[str, Any]], lr: float, momentum: float) -> torch.optim.Optimizer:
        """aihwkit's AnalogSGD (analog tiles apply their own update and LAFT's clip and remap), with the torch tiles'
        clip and remap run for all tiles at once (hetcomp.lower.aihwkit_optim)."""
        from hetcomp.lower.aihwkit_optim import BatchedAnalogSGD

        return BatchedAnalogSGD(groups, lr=lr, momentum=momentum)

    def weight_noise_rel(self, target: Target) -> float:
        """HILAL's gamma: the training weight noise relative to max|W| (``training_noise_rel``)."""
        return float(self.settings(target)["training_noise_rel"])

    def lower(self, module: nn.Module | None, target: Target) -> nn.Module:
        if module is None:
            raise ConfigError(f"target {target.name!r} (aihwkit PCM) stores weights; it cannot run a dynamic "
                              "product of two activations")
        return lower_module(module, target)

    def digital_weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) a digital layer needs to compute what the lowered ``module`` was trained to."""
        weight, bias = module.get_weights()
        return weight, bias

    def repeats_unsupported(self, module: nn.Module) -> str | None:
        from hetcomp.lower.aihwkit_repeats import unsupported

        return unsupported(module)

    def programs(self, module: nn.Module, t_inference: float, program_seeds: list[int]) -> list[torch.Tensor]:
        """The tiles' programmed and drifted weights per repeat (hetcomp.lower.aihwkit_repeats.program)."""
        from hetcomp.lower.aihwkit_repeats import program

        return list(program(module, t_inference, program_seeds))

    def repeated(self, module: nn.Module, t_inference: float, program_seeds: list[int],
                 noise_seeds: list[int], programmed: list[torch.Tensor] | None = None) -> nn.Module:
        """R realizations drawn from the tiles' own noise model, run at once (hetcomp.lower.aihwkit_repeats)."""
        from hetcomp.lower.aihwkit_repeats import RepeatedAnalogLayer, draw_realizations

        drawn = None if programmed is None else tuple(programmed)  # (programmed, drifted): ``programs``' order
        return RepeatedAnalogLayer(module, draw_realizations(module, t_inference, program_seeds, noise_seeds, drawn))

    def program_and_drift(self, module: nn.Module, t_inference: float) -> None:
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


SIMULATOR = AihwkitSimulator()
