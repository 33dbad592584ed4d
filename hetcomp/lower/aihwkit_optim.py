"""aihwkit's AnalogSGD with the post-update step of its torch tiles run for all tiles at once.

After every update, AnalogSGD calls each tile's ``post_update_step``: LAFT's weight clip (LAYER_GAUSSIAN: each tile
clipped at ``sigma`` x its weights' std) and remap (LAYERWISE_SYMMETRIC: the tile's output scales folded into its
weights, which are rescaled to max|W| = 1, the scale kept as the tile's mapping scale and its learned output scales
reset to 1). Per tile that is about 35 small operations and, on CUDA, a host synchronization (aihwkit writes the
scalar 1.0 from host memory into the learned scales); ResNet-20 has 38 tiles. ``BatchedAnalogSGD`` runs the
same arithmetic on every group of equally shaped tiles stacked, and writes the results back in place.

aihwkit's ``set_scales`` also hooks each tile's weight gradient to divide it by the square of the tile's scale at
the last remap. Here one hook per tile reads that scale from the tile's mapping scales when the gradient arrives
(they change only at a remap), registered at the first step as aihwkit registers its own; it is kept in the tile's
``_backward_hook_handle``, so a later aihwkit ``set_scales`` replaces it rather than adding a second.

A torch tile whose clip or remap is not one of those (``_post_update_batchable``) gets its own
``post_update_step``; a model with other tiles (aihwkit's C++ tiles, which update themselves) takes AnalogSGD's
whole step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from aihwkit.optim import AnalogSGD
from aihwkit.optim.context import AnalogContext
from aihwkit.simulator.parameters.enums import WeightClipType, WeightRemapType
from aihwkit.simulator.tiles.inference_torch import TorchInferenceTile

from hetcomp.lower.aihwkit_periphery import per_output


def _post_update_batchable(tile: Any) -> bool:
    """Whether ``tile``'s post-update step is one ``post_update`` reproduces."""
    config = tile.rpu_config
    return (type(tile) is TorchInferenceTile
            and config.clip.type in (WeightClipType.NONE, WeightClipType.FIXED_VALUE, WeightClipType.LAYER_GAUSSIAN)
            and config.remap.type in (WeightRemapType.NONE, WeightRemapType.LAYERWISE_SYMMETRIC,
                                      WeightRemapType.CHANNELWISE_SYMMETRIC)
            and not getattr(config.mapping, "weight_scaling_lr_compensation", False))


class BatchedAnalogSGD(AnalogSGD):
    """AnalogSGD whose torch tiles' clip and remap run stacked (module docstring)."""

    def step(self, closure: Callable | None = None, **kwargs: Any) -> Any:
        tiles = [param.analog_tile for group in self.param_groups for param in group["params"]
                 if isinstance(param, AnalogContext)]
        if not all(isinstance(tile, TorchInferenceTile) for tile in tiles):
            return _unhooked(AnalogSGD.step)(self, closure, **kwargs)
        loss = _unhooked(torch.optim.SGD.step)(self, closure)  # torch tiles update through torch, as in AnalogSGD
        batchable = [_post_update_batchable(tile) for tile in tiles]
        post_update([tile for tile, stacked in zip(tiles, batchable) if stacked])
        for tile, stacked in zip(tiles, batchable):
            if not stacked:
                tile.post_update_step()
        return loss


def _unhooked(step: Callable) -> Callable:
    """A class's ``step`` without the optimizer-hook wrapper torch puts around it (the hooks already run around
    ``BatchedAnalogSGD.step``)."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


@torch.no_grad()
def post_update(tiles: list[Any]) -> None:
    """``TorchInferenceTile.post_update_step`` (clip, then remap) for every tile, equally shaped tiles stacked."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for tile in tiles:
        weight = tile.tile.weight
        config = tile.rpu_config
        learned = None if tile.out_scaling_alpha is None else tuple(tile.out_scaling_alpha.shape)
        groups[(tuple(weight.shape), weight.dtype, weight.device, learned, config.clip.type, config.clip.sigma,
                config.clip.fixed_value, config.remap.type)].append(tile)
    for (*_, clip_type, sigma, fixed_value, remap_type), members in groups.items():
        weights = torch.stack([tile.tile.weight for tile in members])  # [G, out, in]
        if clip_type == WeightClipType.FIXED_VALUE:
            weights = weights.clamp(-fixed_value, fixed_value)
        elif clip_type == WeightClipType.LAYER_GAUSSIAN:
            bound = weights.flatten(1).std(dim=1).mul_(sigma)  # [G]
            if fixed_value > 0:
                bound = bound.clamp(max=fixed_value)
            bound = bound[:, None, None]
            weights = torch.maximum(torch.minimum(weights, bound), -bound)
        if remap_type != WeightRemapType.NONE:
            weights = _remapped(members, weights, remap_type)
        torch._foreach_copy_([tile.tile.weight.data for tile in members], list(weights.unbind(0)))


def _remapped(tiles: list[Any], weights: torch.Tensor, remap_type: Any) -> torch.Tensor:
    """``remap_weights`` then ``set_scales`` per tile: the tiles' scales folded into their weights, the weights
    rescaled to max|W| = 1 (per tile or per output column), the new scales stored as mapping scales, learned output
    scales set to 1."""
    out_size = weights.shape[1]
    scales = torch.stack([_scales(tile, out_size, weights) for tile in tiles])  # [G, out]
    scaled = weights * scales[:, :, None]
    if remap_type == WeightRemapType.LAYERWISE_SYMMETRIC:
        new_scale = scaled.abs().amax(dim=(1, 2))[:, None]  # [G, 1]
    else:
        new_scale = scaled.abs().amax(dim=2)  # [G, out]
    remapped = scaled / new_scale[:, :, None]
    new_scale = new_scale.expand(len(tiles), out_size)
    for tile, scale in zip(tiles, new_scale.unbind(0)):
        if tile.mapping_scales is None or tile.mapping_scales.shape != (out_size,):
            tile.set_mapping_scales(scale.clone())
        _hook_gradient(tile)
    torch._foreach_copy_([tile.mapping_scales for tile in tiles], list(new_scale.unbind(0)))
    learned = [tile.out_scaling_alpha.data for tile in tiles if tile.out_scaling_alpha is not None]
    if learned:
        torch._foreach_copy_(learned, [torch.ones_like(learned[0])] * len(learned))
    return remapped


def _scales(tile: Any, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """aihwkit's ``get_scales`` as a per-output vector: mapping scales times learned output scales (ones if neither)."""
    scales = tile.get_scales()
    return like.new_ones(out_size) if scales is None else per_output(scales, out_size)


def _hook_gradient(tile: Any) -> None:
    """The weight-gradient hook aihwkit's ``TorchInferenceTile.set_scales`` registers (grad / scale**2), reading
    the tile's current mapping scales; registered once."""
    if tile._backward_hook_handle is not None and tile._backward_hook_handle is tile.__dict__.get("_batched_hook"):
        return
    if tile._backward_hook_handle is not None:
        tile._backward_hook_handle.remove()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad / tile.mapping_scales.view(-1, 1) ** 2

    handle = tile.tile.register_weight_hook(hook) if tile.tile.weight.requires_grad else None
    tile._backward_hook_handle = tile.__dict__["_batched_hook"] = handle
