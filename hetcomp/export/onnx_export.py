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
from torch.fx.passes.split_module import split_module

from hetcomp.errors import ConfigError
from hetcomp.graph.layers import mappable_nodes
from hetcomp.manifest import Manifest
from hetcomp.storage import write_atomic

_FX_NODE = re.compile(r"^%(\S+) :")
_LAYER_KEY = "hetcomp.layer"


def _exported_program(gm: fx.GraphModule, inputs: tuple) -> tuple[torch.export.ExportedProgram, bool]:
    batch = torch.export.Dim("batch", min=1)
    try:
        dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
        return torch.export.export(gm, inputs, dynamic_shapes=dynamic, strict=False), True
    except Exception:  # some models specialize the batch size (e.g. reshape to a literal): export static
        return torch.export.export(gm, inputs, strict=False), False


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


def export_onnx(gm: fx.GraphModule, inputs: tuple, manifest: Manifest, path: str | Path) -> Path:
    """Write the whole model to ``path`` with per-node target tags and the manifest embedded."""
    _label_layers(gm)
    program, dynamic = _exported_program(gm, inputs)
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


def export_onnx_split(gm: fx.GraphModule, inputs: tuple, manifest: Manifest, directory: str | Path) -> Path:
    """One ONNX file per contiguous partition plus ``partitions.json`` saying how they connect.

    ``partitions.json``: {"inputs": [names], "outputs": [names], "partitions": [{"file", "target",
    "inputs": [names], "outputs": [names]}]}; names are value names shared across files (a partition's
    inputs are model inputs or earlier partitions' outputs).
    """
    directory = Path(directory)
    layers = {layer["name"]: layer for layer in manifest.layers}
    _label_layers(gm)  # split_module copies node meta, so the submodules' nodes keep their labels
    ids, segment_targets = _segments(gm, layers)
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
        program, _ = _exported_program(submodule, captured[node.target])
        onnx_program = _to_onnx(program)
        _tag_nodes(onnx_program.model, program, layers)
        _rename_io(onnx_program.model, sub_inputs, outputs)
        _save(onnx_program.model, directory / file_name, {"hetcomp.partition_target": target})
        partitions.append({"file": file_name, "target": target, "inputs": sub_inputs, "outputs": outputs})

    connections = {"inputs": [p.name for p in placeholders], "outputs": output_names, "partitions": partitions}
    write_atomic(directory / "partitions.json", json.dumps(connections, indent=2))
    return directory


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
