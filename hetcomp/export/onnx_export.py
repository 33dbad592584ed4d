"""Partitioned ONNX export.

The digital graph is exported with torch.export + the dynamo ONNX exporter, ``optimize=False`` so no
fusion merges nodes of different layers (the optimizer folds e.g. Conv+BN, losing which layer is
which). Each mapped layer's FX node is labelled in ``node.meta["custom"]`` (which survives
torch.export); every ONNX node made from it gets ``metadata_props``:

- ``hetcomp.layer``: the layer name; ``hetcomp.target``: its target (or ``mixed``);
- ``hetcomp.rows``: JSON {target: rows} for a row-split layer.

The model's ``metadata_props["hetcomp.manifest"]`` holds the whole manifest (JSON). ONNX metadata is
advisory (tools may strip it): manifest.json stays the source of truth.

The batch dimension is exported dynamic when the model allows it, else static (recorded in
``hetcomp.dynamic_batch``).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import networkx as nx
import onnx
import onnx_ir
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.split_module import split_module

from hetcomp.errors import ConfigError
from hetcomp.graph.calls import graph_attribute, placeholder_values
from hetcomp.graph.export_frontend import dynamic_shapes, quiet_specialization
from hetcomp.graph.layers import mappable_nodes
from hetcomp.manifest import Manifest
from hetcomp.storage import write_atomic

_FX_NODE = re.compile(r"^%(\S+) :")
_LAYER_KEY = "hetcomp.layer"


def _exported_program(gm: fx.GraphModule, inputs: tuple, kwargs: dict[str, Any] | None = None,
                      every_dim: bool = False) -> tuple[torch.export.ExportedProgram, bool]:
    """``gm`` exported for ONNX, with a dynamic batch (and, for a torch.export front-end graph or ``every_dim``,
    every dimension the graph leaves dynamic: sequence length too) when it allows it, else static;
    (program, dynamic?)."""
    kwargs = kwargs or {}
    if every_dim or _is_export_graph(gm):
        shapes = dynamic_shapes(gm, inputs, kwargs)
    else:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    with quiet_specialization():
        try:
            return torch.export.export(gm, inputs, kwargs=kwargs, dynamic_shapes=shapes, strict=False), True
        except Exception:  # some models specialize the batch size (e.g. reshape to a literal): export static
            return torch.export.export(gm, inputs, kwargs=kwargs, strict=False), False


def _is_export_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` came from the torch.export front end (its inputs are flattened by an input spec)."""
    return getattr(gm.graph._codegen, "pytree_info", None) is not None


def _to_onnx(program: torch.export.ExportedProgram) -> Any:
    # The exporter logs a warning per missing torchvision op at every export: noise for our users.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(program, dynamo=True, optimize=False, verbose=False)
    finally:
        registration_log.setLevel(level)


def _tag_nodes(model_ir: Any, program: torch.export.ExportedProgram, layers: dict[str, dict]) -> int:
    """Stamp hetcomp metadata on every ONNX node made from a mapped layer; returns nodes tagged."""
    layer_of = {}
    for node in program.graph.nodes:
        custom = node.meta.get("custom") or {}
        if _LAYER_KEY in custom:
            layer_of[node.name] = custom[_LAYER_KEY]
    tagged = 0
    for node in model_ir.graph:
        match = _FX_NODE.match(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
        name = layer_of.get(match.group(1)) if match else None
        if name is None:
            continue
        assignment = layers[name]["assignment"]
        node.metadata_props[_LAYER_KEY] = name
        if isinstance(assignment, dict):
            node.metadata_props["hetcomp.target"] = "mixed"
            node.metadata_props["hetcomp.rows"] = json.dumps(assignment)
        else:
            node.metadata_props["hetcomp.target"] = str(assignment)
        tagged += 1
    return tagged


def _label_layers(gm: fx.GraphModule) -> None:
    for node, annotation in mappable_nodes(gm):
        node.meta.setdefault("custom", {})[_LAYER_KEY] = annotation.layer.name


def _save(model_ir: Any, path: Path, metadata: dict[str, str]) -> Path:
    proto = onnx_ir.to_proto(model_ir)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return write_atomic(path, proto.SerializeToString())


def export_onnx(gm: fx.GraphModule, inputs: tuple, manifest: Manifest, path: str | Path,
                kwargs: dict[str, Any] | None = None) -> Path:
    """Write the whole model to ``path`` with per-node target tags and the manifest embedded. ``inputs`` and
    ``kwargs``: example positional and keyword inputs (a torch.export front-end model's keyword inputs become the
    ONNX graph's inputs, by name)."""
    _label_layers(gm)
    program, dynamic = _exported_program(gm, inputs, kwargs)
    onnx_program = _to_onnx(program)
    layers = {layer["name"]: layer for layer in manifest.layers}
    _tag_nodes(onnx_program.model, program, layers)
    return _save(onnx_program.model, Path(path), {
        "hetcomp.manifest": manifest.to_json(), "hetcomp.dynamic_batch": json.dumps(dynamic)})


def _segments(gm: fx.GraphModule, layers: dict[str, dict]) -> tuple[dict[str, int], dict[int, str]]:
    """Partition id per node, and the target of each partition: contiguous runs (in graph order) of
    nodes on one target.

    A node that is not a mapped layer joins the run it sits in (the target of the last mapped layer
    before it; nodes before the first mapped layer join the first run).
    """
    annotated = {node.name: annotation.layer.name for node, annotation in mappable_nodes(gm)}
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]

    def target_of(node: fx.Node) -> str | None:
        if node.name not in annotated:
            return None
        assignment = layers[annotated[node.name]]["assignment"]
        return "mixed:" + json.dumps(assignment, sort_keys=True) if isinstance(assignment, dict) else assignment

    current = next((target_of(n) for n in order if target_of(n) is not None), None)
    segment, ids, targets = 0, {}, {0: current}
    for node in order:
        target = target_of(node)
        if target is not None and target != current:
            segment += 1
            current = target
            targets[segment] = target
        ids[node.name] = segment
    return ids, targets


def _partition_graph(gm: fx.GraphModule, ids: dict[str, int], targets: dict[int, str]) -> nx.DiGraph:
    """The partitions as a DAG: a node per partition (its ``target``), an edge per pair of partitions that
    pass values, naming them (``values``: FX value names, in graph order).

    Each partition becomes one ONNX file fed by its predecessors' outputs, so the graph must be acyclic: a
    cycle (A feeds B and B feeds A) cannot be run file by file and is refused, naming a value on each edge.
    Contiguous runs in graph order never form one; the check keeps any other partitioning honest.
    """
    graph = nx.DiGraph()
    graph.add_nodes_from((index, {"target": target}) for index, target in targets.items())
    for node in gm.graph.nodes:
        if node.name not in ids:
            continue
        for user in node.users:
            if user.name in ids and ids[user.name] != ids[node.name]:
                edge = (ids[node.name], ids[user.name])
                if not graph.has_edge(*edge):
                    graph.add_edge(*edge, values=[])
                if node.name not in graph.edges[edge]["values"]:
                    graph.edges[edge]["values"].append(node.name)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        path = ", ".join(f"partition {a} ({targets[a]}) -> {b} ({targets[b]}) via {graph.edges[a, b]['values'][0]!r}"
                         for a, b in cycle)
        raise ConfigError(f"split ONNX export: the partitions depend on each other in a cycle ({path}), so they "
                          "cannot run one file after another; export one graph instead (split=False)")
    return graph


def export_onnx_split(gm: fx.GraphModule, inputs: tuple, manifest: Manifest, directory: str | Path,
                      kwargs: dict[str, Any] | None = None) -> Path:
    """One ONNX file per contiguous partition plus ``partitions.json`` saying how they connect.

    ``partitions.json``: {"inputs": [names], "outputs": [names], "partitions": [{"file", "target",
    "inputs": [names], "outputs": [names]}]}; names are value names shared across files (a partition's
    inputs are model inputs or earlier partitions' outputs).
    """
    directory = Path(directory)
    layers = {layer["name"]: layer for layer in manifest.layers}
    every_dim = _is_export_graph(gm)
    gm, inputs = _plain(gm, inputs, kwargs or {})
    _label_layers(gm)  # split_module copies node meta, so the submodules' nodes keep their labels
    ids, segment_targets = _segments(gm, layers)
    _localize_scalars(gm, ids)
    _localize_attributes(gm, ids)
    graph = _partition_graph(gm, ids, segment_targets)
    parent = split_module(gm, gm, lambda node: ids[node.name], keep_original_order=True)

    # Run the parent once to capture each partition's real inputs (for tracing/export).
    captured: dict[str, tuple] = {}
    env: dict[str, Any] = {}
    placeholders = [n for n in parent.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, inputs):
        env[node.name] = value
    partitions = []
    output_names: list[str] = []
    with torch.no_grad():
        for node in parent.graph.nodes:
            if node.op == "call_module":
                args = tuple(env[a.name] for a in node.args)
                captured[node.target] = args
                env[node.name] = getattr(parent, node.target)(*args)
            elif node.op == "call_function":  # getitem on a partition's tuple output
                source, index = node.args
                env[node.name] = env[source.name][index]
            elif node.op == "output":
                result = node.args[0]
                output_names = [r.name for r in (result if isinstance(result, tuple | list) else [result])]

    calls = {node.target: node for node in parent.graph.nodes if node.op == "call_module"}
    for index in nx.lexicographical_topological_sort(graph):  # producers first; graph order among equals
        node = calls[f"submod_{index}"]  # split_module's name for partition ``index``
        submodule = getattr(parent, node.target)
        target = graph.nodes[index]["target"]
        users = list(node.users)
        if users and all(u.op == "call_function" for u in users):
            outputs = [u.name for u in sorted(users, key=lambda u: u.args[1])]
        else:
            outputs = [node.name]
        file_name = f"part{len(partitions)}_{'mixed' if target.startswith('mixed') else target}.onnx"
        sub_inputs = [a.name for a in node.args]
        program, _ = _exported_program(submodule, captured[node.target], every_dim=every_dim)
        onnx_program = _to_onnx(program)
        _tag_nodes(onnx_program.model, program, layers)
        _rename_io(onnx_program.model, sub_inputs, outputs)
        _save(onnx_program.model, directory / file_name, {"hetcomp.partition_target": target})
        partitions.append({"file": file_name, "target": target, "inputs": sub_inputs, "outputs": outputs})

    connections = {"inputs": [p.name for p in placeholders], "outputs": output_names, "partitions": partitions}
    write_atomic(directory / "partitions.json", json.dumps(connections, indent=2))
    return directory


def _plain(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> tuple[fx.GraphModule, tuple]:
    """A torch.export front-end graph as a plain FX graph of positional inputs (its flattened placeholders, e.g.
    input_ids, token_type_ids, attention_mask) and a flat tuple of outputs, without its input-guard call: what
    split_module can cut into partitions that each export on their own. Other graphs are returned as they are.
    ``gm`` is changed in place (the caller exports from a copy)."""
    if not _is_export_graph(gm):
        return gm, args
    flat = tuple(placeholder_values(gm, args, kwargs))
    gm.graph._codegen = fx.graph.CodeGen()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            gm.graph.erase_node(node)  # shape checks of the inputs; each partition's export checks its own
    gm.recompile()
    return gm, flat


_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def _scalar(node: fx.Node) -> bool:
    """A node whose value is a Python scalar (a symbolic size such as ``sym_size(input_ids, 1)``, or arithmetic on
    one), not a tensor."""
    return node.op == "call_function" and isinstance(node.meta.get("val"), _SCALARS)


def _localize_scalars(gm: fx.GraphModule, ids: dict[str, int]) -> None:
    """Recompute every scalar a partition reads from another partition inside it (a copy of the node, and of the
    scalars it reads in turn, placed before its user), so partitions pass only tensors between them: an ONNX
    file's inputs are tensors, and a size read from a tensor stays dynamic in each file."""
    graph = gm.graph

    def copy_into(node: fx.Node, user: fx.Node) -> fx.Node:
        def argument(value: fx.Node) -> fx.Node:
            return copy_into(value, user) if _scalar(value) and ids.get(value.name) != ids[user.name] else value

        with graph.inserting_before(user):
            new = graph.node_copy(node, argument)
        ids[new.name] = ids[user.name]
        return new

    for node in list(graph.nodes):
        if not _scalar(node) or node.name not in ids:
            continue
        for user in list(node.users):
            if user.name in ids and ids[user.name] != ids[node.name]:
                user.replace_input_with(node, copy_into(node, user))
    graph.lint()
    gm.recompile()


class _Constant(nn.Module):
    """A tensor the graph reads by attribute (a weight, a buffer), as a module a partition calls: split_module hands
    a partition a tensor attribute as an input, which would make every weight an input of its ONNX file."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach())

    def forward(self) -> torch.Tensor:
        return self.value


def _localize_attributes(gm: fx.GraphModule, ids: dict[str, int]) -> None:
    """Each tensor attribute the graph reads (``get_attr``) becomes a call of a ``_Constant`` module in every
    partition that reads it, so that it is a constant (an initializer) of that partition's ONNX file."""
    graph = gm.graph
    holders: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = graph_attribute(gm, str(node.target))
        if not isinstance(value, torch.Tensor):
            continue
        if node.target not in holders:
            holders[node.target] = f"hetcomp_constant_{len(holders)}"
            gm.add_submodule(holders[node.target], _Constant(value))
        for user in list(node.users):
            if user.name not in ids:
                continue
            with graph.inserting_before(user):
                call = graph.call_module(holders[node.target])
            call.meta = dict(node.meta)
            ids[call.name] = ids[user.name]
            user.replace_input_with(node, call)
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _rename_io(model_ir: Any, inputs: list[str], outputs: list[str]) -> None:
    graph = model_ir.graph
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise ConfigError(
            f"partition I/O mismatch: ONNX has {len(graph.inputs)} inputs/{len(graph.outputs)} outputs, "
            f"expected {len(inputs)}/{len(outputs)} (a partition with non-tensor or nested inputs/outputs); export "
            "one graph instead (split=False)"
        )
    for value, name in zip(graph.inputs, inputs):
        value.name = name
    for value, name in zip(graph.outputs, outputs):
        value.name = name
