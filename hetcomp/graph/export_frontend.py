"""torch.export front end: for models torch.fx cannot symbolic_trace (Hugging Face transformers 5.x).

``torch.export.export(model, args, kwargs=..., strict=False)`` gives an ATen-level graph (dynamic shapes where the
model allows them: ``Dim.AUTO`` on every input dimension); ``ep.module()`` is an FX GraphModule with the parameters
as attributes, callable like the model (same args, kwargs and output structure). Then:

- ``aten.scaled_dot_product_attention`` is decomposed in place into its two dynamic products
  (``q @ k^T`` and ``softmax(...) @ v``) with the scale, mask and causal fill between them, so that each is
  a mappable node like the fx front end's explicit matmuls (eval mode: dropout must be 0);
- layers are recognized from ATen ops: ``aten.linear`` on a parameter is weight-static, named by the
  qualified name of the module it came from (``nn_module_stack``); ``aten.matmul``/``bmm`` of two
  activations are dynamic. Lowering replaces these nodes with calls to inserted modules.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from hetcomp.checks import describe_inputs
from hetcomp.errors import TraceError
from hetcomp.graph.fx_frontend import is_parameter, per_sample, shape_of, shape_prop
from hetcomp.graph.layers import DYNAMIC, WEIGHT_STATIC, LayerInfo

aten = torch.ops.aten


def dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Every dimension of every tensor input ``Dim.AUTO`` (dynamic where the model allows it: batch size, sequence
    length; specialized silently where it does not: a hidden size a weight fixes), keyed by the forward's parameter
    names; None when the inputs cannot be named so (then the example's shapes are exported)."""
    def dims(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return dict.fromkeys(range(value.dim()), torch.export.Dim.AUTO)
        return None

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    positional = [name for name, p in parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional) or any(key not in parameters for key in kwargs):
        return None
    return {**{name: dims(x) for name, x in zip(positional, args)}, **{key: dims(x) for key, x in kwargs.items()}}


@contextlib.contextmanager
def quiet_specialization() -> Iterator[None]:
    """Hold back torch.export's warning for each ``Dim.AUTO`` dimension it specializes (a broadcast dimension of
    size 1, a hidden size): expected whenever every dimension is offered as dynamic."""
    log = logging.getLogger("torch._export.non_strict_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def export_module(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> fx.GraphModule:
    """The model's ATen graph, with dynamic shapes where the model allows them (then the graph takes batches of
    any size and any sequence length: real data's last batch, padding to the longest sequence of each batch), else
    with the example inputs' shapes."""
    shapes = dynamic_shapes(model, args, kwargs)
    try:
        program = None
        if shapes is not None:
            try:
                with quiet_specialization():
                    program = torch.export.export(model, args, kwargs=kwargs, strict=False, dynamic_shapes=shapes)
            except Exception:  # a model that cannot be exported with symbolic shapes: the example's shapes
                program = None
        if program is None:
            program = torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as err:
        raise TraceError(
            f"torch.export could not export {type(model).__name__} with example inputs "
            f"({describe_inputs(kwargs or args)}) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass a batch shaped like the model's input (e.g. "
            "one batch of your data); for Hugging Face models pass use_cache=False in the example kwargs and call "
            "model.eval() first"
        ) from err
    gm = program.module()
    decompose_attention(gm)
    flat, _ = pytree.tree_flatten((args, kwargs))
    shape_prop(gm, flat, kwargs or args, type(model).__name__)
    return gm


def _causal_fill(scores: torch.Tensor) -> torch.Tensor:
    rows, cols = scores.shape[-2], scores.shape[-1]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril(cols - rows)
    return scores.masked_fill(~keep, float("-inf"))


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:  # True = attend (SDPA's convention)
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def decompose_attention(gm: fx.GraphModule) -> int:
    """Replace every ``aten.scaled_dot_product_attention`` by matmul, scale, mask, softmax, matmul."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        params = {**dict(zip(names, node.args)), **node.kwargs}
        if params.get("dropout_p", 0.0):
            raise TraceError(f"{node.name}: attention dropout {params['dropout_p']} is on; export in eval mode")
        if params.get("enable_gqa"):
            raise TraceError(f"{node.name}: grouped-query attention (enable_gqa) is not decomposed yet")
        query, key, value = params["query"], params["key"], params["value"]
        scale = params.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(query.meta["val"].shape[-1])
        with graph.inserting_before(node):
            key_t = graph.call_function(aten.transpose.int, (key, -2, -1))
            product = graph.call_function(aten.matmul.default, (query, key_t))
            scores = graph.call_function(aten.mul.Tensor, (product, float(scale)))
            if params.get("attn_mask") is not None:
                scores = graph.call_function(_apply_mask, (scores, params["attn_mask"]))
            if params.get("is_causal"):
                scores = graph.call_function(_causal_fill, (scores,))
            weights = graph.call_function(aten._softmax.default, (scores, -1, False))
            context = graph.call_function(aten.matmul.default, (weights, value))
        for new, role in ((product, "scores"), (context, "context")):
            new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
            new.meta["hetcomp_role"] = role  # names the layer: <attention module>.scores / .context
        node.replace_all_uses_with(context)
        graph.erase_node(node)
        count += 1
    graph.lint()
    gm.recompile()
    return count


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


_MATMULS = {aten.matmul.default, aten.bmm.default, aten.mm.default}


def find_layers(gm: fx.GraphModule, batch_size: int) -> list[tuple[fx.Node, LayerInfo]]:
    found: list[tuple[fx.Node, LayerInfo]] = []
    names: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or (node.target is not aten.linear.default and node.target not in _MATMULS):
            continue
        lhs, rhs = node.args[0], node.args[1]
        out_shape, lhs_shape, rhs_shape = shape_of(node), shape_of(lhs), shape_of(rhs)
        if out_shape is None or lhs_shape is None or rhs_shape is None:
            continue
        macs = per_sample(math.prod(out_shape) * lhs_shape[-1], batch_size)
        path = _module_path(node)
        if node.target is aten.linear.default:
            weight = is_parameter(gm, rhs)
            if weight is None:
                continue  # a linear on an activation: not a fixed weight matrix
            bias = node.args[2] if len(node.args) > 2 else None
            name = weight.rsplit(".", 1)[0] if weight.endswith(".weight") else node.name
            name = name if name not in names else f"{name}@{node.name}"  # a module called twice
            info = LayerInfo(name=name, kind=WEIGHT_STATIC, op="linear", weight_shape=rhs_shape, rows=rhs_shape[0],
                             params=math.prod(rhs_shape), macs=macs, node_name=node.name, weight_param=weight,
                             extra={"bias_param": is_parameter(gm, bias), "module_path": path})
        else:
            if is_parameter(gm, rhs) is not None:
                continue  # x @ W on a parameter is rare in exported HF models; not mapped
            rows = rhs_shape[-1] if len(rhs_shape) > 1 else 1
            role = node.meta.get("hetcomp_role", node.name)
            name = f"{path}.{role}" if path else node.name
            name = name if name not in names else f"{name}@{node.name}"
            info = LayerInfo(name=name, kind=DYNAMIC, op="matmul", weight_shape=rhs_shape, rows=rows, params=0,
                             macs=macs, node_name=node.name, extra={"module_path": path})
        names.add(info.name)
        found.append((node, info))
    return found
