"""Graph construction: trace a model into an FX GraphModule with mappable layers annotated.

``trace`` is the front door. Front ends are a table (``FRONTENDS``): each turns a model into an
FX GraphModule and finds its mappable layers as ``LayerInfo`` records; passes only ever see those
records (``mappable_nodes``), never a front end's raw op names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp.errors import TraceError
from hetcomp.graph import fx_frontend
from hetcomp.graph.layers import META_KEY, LayerAnnotation, LayerInfo, annotate, layer_annotations, mappable_nodes

__all__ = ["trace", "LayerInfo", "LayerAnnotation", "mappable_nodes", "layer_annotations", "META_KEY"]


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def trace(
    model: nn.Module,
    example_inputs,
    *,
    leaf_modules: Sequence[type | str] = (),
) -> fx.GraphModule:
    """Trace ``model`` to an FX GraphModule with shapes propagated and mappable layers annotated.

    Each mappable node carries a ``LayerAnnotation`` under ``node.meta["hetcomp"]``. The batch size
    for per-sample MACs is the leading dimension of the first example input.

    Raises TraceError naming the failing module (and how to mark it a leaf), when the example inputs
    do not run, or when the model has no mappable layer.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"hetcomp.trace takes a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
        raise TraceError("example_inputs needs at least one batched tensor (batch = leading dimension)")
    gm = fx_frontend.symbolic_trace(model, leaf_modules)
    fx_frontend.propagate_shapes(gm, inputs)
    batch_size = inputs[0].shape[0]
    layers = fx_frontend.find_layers(gm, batch_size)
    if not layers:
        raise TraceError(
            f"{type(model).__name__} has no mappable layer (nn.Linear, nn.Conv1d/2d or a matrix product); "
            "hetcomp maps only those to accelerators"
        )
    for node, info in layers:
        annotate(node, info)
    gm.meta[META_KEY] = {"batch_size": batch_size, "frontend": "fx"}
    return gm
