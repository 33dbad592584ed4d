"""torch.fx front end: symbolic_trace + ShapeProp, then recognize mappable layers from the FX graph.

Recognition is a table: each recognizer looks at one node and returns a LayerInfo or None. A second
front end (torch.export, ATen-level) supplies its own table and yields the same LayerInfo records.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import sys
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from hetcomp.checks import describe_inputs
from hetcomp.errors import TraceError
from hetcomp.graph.layers import DYNAMIC, WEIGHT_STATIC, LayerInfo


class _PathTracer(fx.Tracer):
    """A Tracer that remembers which module it is inside, so a failure can name it."""

    def __init__(self, leaf_modules: Sequence[type | str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.hetcomp_path: list[tuple[str, str]] = []  # (qualified name, class) of modules being traced

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.hetcomp_path.append((name, type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.hetcomp_path.pop()  # not reached on failure: the path then names the failing module
        return result


def symbolic_trace(model: nn.Module, leaf_modules: Sequence[type | str] = ()) -> fx.GraphModule:
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # torch raises several types here (TraceError, TypeError, ...)
        where = tracer.hetcomp_path[-1] if tracer.hetcomp_path else ("", type(model).__name__)
        path = where[0] or "<root>"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: failed inside module '{path}' ({where[1]}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            f"Mark it a leaf so it is called opaquely: hetcomp.trace(model, inputs, leaf_modules=['{path}']) "
            f"or leaf_modules=[{where[1]}]"
        ) from err
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, so a failure can name it."""

    hetcomp_node: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.hetcomp_node = n
        return super().run_node(n)


def shape_prop(gm: fx.GraphModule, flat_inputs: Sequence, example_inputs, model_name: str) -> None:
    """Run ShapeProp; a failure is a TraceError saying the example inputs do not run through the model.

    ShapeProp prints the traceback of a failing node to stderr before it re-raises; that print is held
    back (the TraceError chains the original error), and shown as usual when nothing fails."""
    runner = _ShapeProp(gm)
    held = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(held):
            runner.propagate(*flat_inputs)
    except Exception as err:
        original = err.__cause__ if err.__cause__ is not None and str(err).startswith("ShapeProp error") else err
        raise TraceError(inputs_do_not_run(example_inputs, model_name, original, gm, runner.hetcomp_node)) \
            from original
    sys.stderr.write(held.getvalue())


def inputs_do_not_run(example_inputs, model_name: str, error: BaseException, gm: fx.GraphModule | None = None,
                      node: fx.Node | None = None) -> str:
    """"example inputs (shape [2, 3], float32) do not run through Net: <error> (at ...); pass a batch ..."."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    where = ""
    if node is not None and node.op == "call_module" and gm is not None:
        try:
            where = f" (at module '{node.target}', {type(gm.get_submodule(node.target)).__name__})"
        except AttributeError:
            where = f" (at module '{node.target}')"
    elif node is not None and node.op not in ("placeholder", "output"):
        where = f" (at node '{node.name}')"
    return (f"example inputs ({describe_inputs(example_inputs)}) do not run through {model_name}: "
            f"{type(error).__name__}: {first_line}{where}; pass a batch shaped like the model's input (e.g. one "
            "batch of your data)")


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    shape_prop(gm, example_inputs, example_inputs, gm.__class__.__name__)


# Helpers shared by both front ends (export_frontend imports them).
def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The node's output shape from ShapeProp's tensor_meta (None if it has none)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def is_parameter(gm: fx.GraphModule, node: object) -> str | None:
    """The qualified parameter name if ``node`` is a get_attr of a parameter."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            gm.get_parameter(node.target)
            return str(node.target)
        except AttributeError:
            return None
    return None


def per_sample(total: int, batch_size: int) -> int:
    """MACs of the traced batch, per sample."""
    return int(total // max(batch_size, 1))


def _recognize_module(gm: fx.GraphModule, node: fx.Node, batch_size: int) -> LayerInfo | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    out_shape = shape_of(node)
    if out_shape is None:
        return None
    out_numel = math.prod(out_shape)
    bias_params = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    if isinstance(module, nn.Linear):
        weight = module.weight
        return LayerInfo(
            name=str(node.target), kind=WEIGHT_STATIC, op="linear", weight_shape=tuple(weight.shape),
            rows=module.out_features, params=weight.numel() + bias_params,
            macs=per_sample(out_numel * module.in_features, batch_size), node_name=node.name,
            module_name=str(node.target), weight_param=f"{node.target}.weight",
        )
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        weight = module.weight
        # Each output element costs (in_channels / groups) * prod(kernel) MACs.
        macs_per_output = weight.shape[1] * math.prod(weight.shape[2:])
        return LayerInfo(
            name=str(node.target), kind=WEIGHT_STATIC, op=f"conv{weight.dim() - 2}d",
            weight_shape=tuple(weight.shape), rows=module.out_channels, params=weight.numel() + bias_params,
            macs=per_sample(out_numel * macs_per_output, batch_size), node_name=node.name,
            module_name=str(node.target), weight_param=f"{node.target}.weight", groups=module.groups,
        )
    return None


_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}


def _recognize_matmul(gm: fx.GraphModule, node: fx.Node, batch_size: int) -> LayerInfo | None:
    is_matmul = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )
    is_linear = node.op == "call_function" and node.target is F.linear
    if not (is_matmul or is_linear):
        return None
    lhs, rhs = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    out_shape, lhs_shape, rhs_shape = shape_of(node), shape_of(lhs), shape_of(rhs)
    if out_shape is None or lhs_shape is None or rhs_shape is None:
        return None
    reduction = lhs_shape[-1]  # K in [.., N, K] @ [.., K, M] and in linear(x[.., K], w[M, K])
    rows = rhs_shape[0] if is_linear else (rhs_shape[-1] if len(rhs_shape) > 1 else 1)
    macs = per_sample(math.prod(out_shape) * reduction, batch_size)
    weight_param = is_parameter(gm, rhs)
    if weight_param is not None:
        bias = (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")) if is_linear else None
        return LayerInfo(
            name=node.name, kind=WEIGHT_STATIC, op="linear" if is_linear else "matmul",
            weight_shape=rhs_shape, rows=rows, params=math.prod(rhs_shape), macs=macs, node_name=node.name,
            weight_param=weight_param, extra={"bias_param": is_parameter(gm, bias)},
        )
    # Both operands are activations: a dynamic matrix product (e.g. attention scores/context).
    return LayerInfo(
        name=node.name, kind=DYNAMIC, op="matmul", weight_shape=rhs_shape, rows=rows, params=0, macs=macs,
        node_name=node.name,
    )


RECOGNIZERS: list[Callable[[fx.GraphModule, fx.Node, int], LayerInfo | None]] = [
    _recognize_module,
    _recognize_matmul,
]


def find_layers(gm: fx.GraphModule, batch_size: int) -> list[tuple[fx.Node, LayerInfo]]:
    """Every mappable node's layer record. A module called more than once is one layer per call (each call
    site is its own mapping decision: ``name``, then ``name@node`` for later calls), as the torch.export front
    end names them; lowering lowers such calls at their graph node."""
    found, names = [], set()
    for node in gm.graph.nodes:
        for recognize in RECOGNIZERS:
            info = recognize(gm, node, batch_size)
            if info is not None:
                if info.name in names:
                    info.name = f"{info.name}@{node.name}"
                names.add(info.name)
                found.append((node, info))
                break
    return found
