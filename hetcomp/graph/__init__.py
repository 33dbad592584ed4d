"""Graph construction: trace a model into an FX GraphModule with mappable layers annotated.

``trace`` is the front door. Front ends are a table (``FRONTENDS``): each turns a model into an
FX GraphModule and finds its mappable layers as ``LayerInfo`` records; passes only ever see those
records (``mappable_nodes``), never a front end's raw op names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp.data import move
from hetcomp.errors import TraceError
from hetcomp.graph import export_frontend, fx_frontend
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


FRONTENDS = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    example_inputs,
    *,
    leaf_modules: Sequence[type | str] = (),
    frontend: str = "auto",
) -> fx.GraphModule:
    """Trace ``model`` to an FX GraphModule with shapes propagated and mappable layers annotated.

    Each mappable node carries a ``LayerAnnotation`` under ``node.meta["hetcomp"]``. The batch size
    for per-sample MACs is the leading dimension of the first example input.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict (any mapping, e.g. a tokenizer's
    ``BatchEncoding``) of keyword inputs (Hugging Face style: ``{"input_ids": ids, "use_cache": False}``).
    ``frontend``: "fx" (torch.fx symbolic_trace), "export" (torch.export, ATen level: for models fx cannot
    trace, e.g. transformers 5.x), or "auto": fx, falling back to export when fx fails or the inputs are keywords.

    Raises TraceError naming the failing module (and how to mark it a leaf), when the example inputs
    do not run, or when the model has no mappable layer.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"hetcomp.trace takes a torch.nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown front end {frontend!r}; known: {', '.join(FRONTENDS)}")
    parameter = next(model.parameters(), None)
    if parameter is not None:  # the device follows the model: example inputs (or a CPU loader's batch) go to it
        example_inputs = move(example_inputs, parameter.device)
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else {}  # a BatchEncoding too
    inputs = () if kwargs else _as_tuple(example_inputs)
    tensors = [x for x in (*inputs, *kwargs.values()) if isinstance(x, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise TraceError("example_inputs needs at least one batched tensor (batch = leading dimension)")
    batch_size = tensors[0].shape[0]
    if kwargs and frontend == "fx":
        raise TraceError("keyword example inputs need the torch.export front end (frontend='export' or 'auto')")
    if frontend == "export" or kwargs:
        gm, used = export_frontend.export_module(model, inputs, kwargs), "export"
    else:
        try:
            gm, used = fx_frontend.symbolic_trace(model, leaf_modules), "fx"
        except TraceError as fx_error:
            if frontend == "fx":
                raise
            try:
                gm, used = export_frontend.export_module(model, inputs, kwargs), "export"
            except TraceError as export_error:
                raise TraceError(f"{fx_error} (torch.export failed too: {export_error})") from fx_error
        if used == "fx":
            fx_frontend.propagate_shapes(gm, inputs)
    find = fx_frontend.find_layers if used == "fx" else export_frontend.find_layers
    layers = find(gm, batch_size)
    if not layers:
        raise TraceError(
            f"{type(model).__name__} has no mappable layer (nn.Linear, nn.Conv1d/2d or a matrix product); "
            "hetcomp maps only those to accelerators"
        )
    for node, info in layers:
        annotate(node, info)
    gm.meta[META_KEY] = {"batch_size": batch_size, "frontend": used}
    return gm
