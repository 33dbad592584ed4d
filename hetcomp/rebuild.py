"""Back from a saved compile: ``hetcomp.load`` (a folder ``save`` wrote) and ``apply_manifest`` (a manifest
alone, on a model whose weights are already the compiled ones or need no fine-tuning).

Nothing in a manifest is trusted: it is validated against the schema (``Manifest.load``), then layer by
layer against the model traced here (names, kinds, shapes, rows, MACs), each assignment against the target
set (known target, op kind supported, row counts summing to the layer's rows, per-row tiers matching the
counts), and the summary is recomputed. The manifest carries each target's definition, so a target
registered only in the compiling process still loads; a target whose simulator is code names the module
to import. The caller's model is never modified: it is traced from a deep copy in eval mode.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hetcomp.compiler import CompiledModel, example_inputs_of, leaf_module_names, set_eval
from hetcomp.errors import HetcompError, ManifestError, TargetError
from hetcomp.graph import META_KEY, trace
from hetcomp.graph.layers import LayerAnnotation, mappable_nodes
from hetcomp.manifest import Manifest, decode_row_targets, fingerprint, weights_hash
from hetcomp.partition.summary import mapping_summary
from hetcomp.targets import registry as target_registry
from hetcomp.targets.base import Target, TargetSet

WEIGHTS_FILE = "weights.safetensors"


def load(directory: str | Path, model: nn.Module, example_inputs: Any,
         leaf_modules: Sequence[type | str] = ()) -> CompiledModel:
    """The ``CompiledModel`` that ``compiled.save(directory)`` wrote: same manifest, fine-tuned weights (read
    from ``weights.safetensors`` and checked against the manifest's hash), same lowering, so ``evaluate(...,
    seed=s)`` gives what the saved object gave. ``model`` supplies the architecture (an instance of the
    compiled class, any weights); ``example_inputs`` as for compile; ``leaf_modules`` as given to compile.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a folder; pass the folder that compiled.save() wrote")
    manifest = Manifest.load(directory / "manifest.json")
    weights = _read_weights(directory / WEIGHTS_FILE)
    return _rebuild(model, manifest, example_inputs, leaf_modules, weights)


def apply_manifest(model: nn.Module, manifest: Manifest | str | Path, example_inputs: Any,
                   leaf_modules: Sequence[type | str] = ()) -> CompiledModel:
    """Re-create a compiled model from a manifest without re-running analysis, on ``model``'s own weights.

    The model's weights must be those compile was given, or the compiled ones; a manifest whose compile
    fine-tuned the weights (LAFT) is refused on the original weights: use ``hetcomp.load`` on the saved
    folder. Refuses a manifest of another model, naming the mismatch.
    """
    # A Manifest object (e.g. edited in memory) is checked exactly as a file would be.
    manifest = Manifest.from_dict(manifest.to_dict()) if isinstance(manifest, Manifest) else Manifest.load(manifest)
    return _rebuild(model, manifest, example_inputs, leaf_modules, None)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"no {path.name} in {path.parent}; the folder is incomplete (save it again)") from None
    try:
        return safetensors_load(content)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ManifestError(f"{path} is not a valid safetensors file ({err}); save the compile again") from None


def _rebuild(model: nn.Module, manifest: Manifest, example_inputs: Any, leaf_modules: Sequence[type | str],
             weights: dict[str, torch.Tensor] | None) -> CompiledModel:
    if not isinstance(model, nn.Module):
        raise ManifestError(f"model must be a torch.nn.Module (an instance of the compiled class "
                            f"{manifest.model['class']}), got {type(model).__name__}")
    target_set = manifest_targets(manifest)
    inputs = example_inputs_of(example_inputs)  # a mapping (e.g. a BatchEncoding) is keyword inputs
    working = copy.deepcopy(model)  # never the caller's model
    set_eval(working)
    gm = trace(working, inputs, leaf_modules=leaf_modules, frontend=manifest.model["frontend"])
    found = fingerprint(gm, working)
    expected = manifest.model
    annotations = {a.layer.name: a for _, a in mappable_nodes(gm)}
    _check_model(found, expected, annotations, manifest, leaf_modules)
    if weights is not None:
        _load_weights(gm, weights, expected["compiled_weights"])
    elif found["weights"] != expected["compiled_weights"]:
        if found["weights"] != expected["weights"]:
            raise ManifestError("manifest does not match this model: weights differ (it was made for other weights)")
        raise ManifestError("this manifest's compile fine-tuned the weights (LAFT); on the original weights "
                            "apply_manifest would give the pre-fine-tuning model: use hetcomp.load(folder, model, "
                            "example_inputs) on the folder compiled.save() wrote")
    for layer in manifest.layers:
        _apply_layer(annotations[layer["name"]], layer, target_set)
    gm.meta[META_KEY]["applied_from_manifest"] = True
    set_eval(gm)
    rebuilt = copy.deepcopy(manifest)
    rebuilt.target_set = str(target_set)
    rebuilt.summary = mapping_summary(rebuilt.layers, list(target_set))  # derived: recomputed, never trusted
    return CompiledModel(gm, rebuilt, inputs, target_set)


def read_manifest(path: str | Path) -> Manifest:
    """A manifest checked as far as it can be without the model: schema, target definitions, every layer's
    assignment against the target set and its recorded kind and rows; the summary recomputed. For tools
    that only read (``hetcomp report``); ``load``/``apply_manifest`` also check it against the model."""
    manifest = Manifest.load(path)
    target_set = manifest_targets(manifest, need_simulators=False)
    for record in manifest.layers:
        checked_assignment(record, record["kind"], record["rows"], target_set)
    manifest.summary = mapping_summary(manifest.layers, list(target_set))
    return manifest


def manifest_targets(manifest: Manifest, need_simulators: bool = True) -> TargetSet:
    """The target set the manifest was compiled for, from the definitions it carries (a registered target of
    the same name but another definition is not used: the manifest's is what was compiled)."""
    from hetcomp.lower import SIMULATORS, remember_simulator_module, simulator_named

    definitions = manifest.targets
    names = [part.strip() for part in manifest.target_set.split("+")]
    defined = [d["name"] for d in definitions]
    if sorted(names) != sorted(defined) or len(set(defined)) != len(defined):
        raise ManifestError(f"manifest target_set {manifest.target_set!r} does not match its target definitions "
                            f"{defined}")
    targets = []
    for definition in definitions:
        try:
            target = Target.from_dict(definition)
        except TargetError as err:
            raise ManifestError(str(err)) from None
        remember_simulator_module(target.name, definition.get("simulator_module"))
        simulator = target.simulator
        if need_simulators and simulator is not None and simulator not in SIMULATORS:
            module = definition.get("simulator_module")
            hint = f"import {module} first (it registers it)" if module else "register it first"
            raise ManifestError(f"target {target.name!r} needs simulator {simulator!r}, which this process does "
                                f"not have: {hint}")
        if need_simulators and simulator is not None:
            try:
                simulator_named(simulator).check(target)  # its device parameters, before any work
            except HetcompError as err:
                raise ManifestError(f"manifest target {target.name!r}: {err}") from None
        if target.name in target_registry.available() and target_registry.get(target.name) != target:
            warnings.warn(f"target {target.name!r} differs from the registered one; using the manifest's "
                          "definition (what was compiled)", stacklevel=3)
        targets.append(target)
    return TargetSet.of(targets)


def _check_model(found: dict[str, str], expected: dict[str, Any], annotations: dict[str, LayerAnnotation],
                 manifest: Manifest, leaf_modules: Sequence[type | str]) -> None:
    problems = []
    if found["class"] != expected["class"]:
        problems.append(f"model class {found['class']!r} != manifest's {expected['class']!r}")
    names = [layer["name"] for layer in manifest.layers]
    if set(annotations) != set(names):
        only_manifest = sorted(set(names) - set(annotations))
        only_model = sorted(set(annotations) - set(names))
        problems.append(f"layers only in the manifest: {only_manifest[:5]}, only in the model: {only_model[:5]}")
    for layer in manifest.layers:
        got = annotations.get(layer["name"])
        if got is None:
            continue
        info = got.layer
        traced = {"kind": info.kind, "op": info.op, "shape": list(info.weight_shape), "rows": info.rows,
                  "macs": info.macs, "params": info.params, "groups": info.groups}
        for key, value in traced.items():
            if key in layer and layer[key] != value:
                problems.append(f"layer {layer['name']!r} {key} {layer[key]!r} in the manifest, {value!r} in the model")
    if found["architecture"] != expected["architecture"] and not problems:
        recorded = expected.get("leaf_modules") or []
        given = leaf_module_names(leaf_modules)
        hint = f" (compiled with leaf_modules={recorded}, given {given})" if recorded != given else ""
        problems.append(f"architecture (traced graph or parameter shapes) differs{hint}")
    if problems:
        raise ManifestError("manifest does not match this model: " + "; ".join(problems[:6]))


def _load_weights(gm: nn.Module, weights: dict[str, torch.Tensor], expected_hash: str) -> None:
    state = gm.state_dict()
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise ManifestError(f"{WEIGHTS_FILE} does not fit the model (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); it was saved for another model")
    wrong = [k for k in state if weights[k].shape != state[k].shape or weights[k].dtype != state[k].dtype]
    if wrong:
        raise ManifestError(f"{WEIGHTS_FILE}: tensors {wrong[:3]} have the wrong shape or dtype")
    with torch.no_grad():
        for key, tensor in state.items():
            tensor.copy_(weights[key])
    if weights_hash(gm) != expected_hash:
        raise ManifestError(f"{WEIGHTS_FILE} does not match the manifest's compiled_weights hash: the file was "
                            "changed or comes from another compile; save the compile again")


def _apply_layer(annotation: LayerAnnotation, record: dict[str, Any], target_set: TargetSet) -> None:
    """Check one layer's assignment against the target set and the traced layer, then annotate."""
    row_targets = checked_assignment(record, annotation.layer.kind, annotation.layer.rows, target_set)
    annotation.metrics = dict(record["metrics"])
    annotation.assignment = record["assignment"]
    annotation.reason = record["reason"]
    annotation.row_targets = row_targets


def checked_assignment(record: dict[str, Any], kind: str, rows: int,
                       target_set: TargetSet) -> list[str] | None:
    """Raise ManifestError unless the layer's assignment is valid for a ``kind`` layer of ``rows`` rows; returns
    its per-row targets (None for a whole layer)."""
    name, assignment = record["name"], record["assignment"]
    split = assignment if isinstance(assignment, dict) else {assignment: rows}
    for target in split:
        if target not in target_set:
            raise ManifestError(f"layer {name!r} is assigned to {target!r}, which is not in the manifest's target "
                                f"set {target_set}")
        if not target_set[target].supports_kind(kind):
            raise ManifestError(f"layer {name!r} ({kind}) is assigned to {target!r}, which does not run {kind} ops")
    if not isinstance(assignment, dict):
        if record.get("row_tiers"):
            raise ManifestError(f"layer {name!r} is assigned whole to {assignment!r} but lists row_tiers")
        return None
    if sum(split.values()) != rows:
        raise ManifestError(f"layer {name!r}: row counts {split} sum to {sum(split.values())}, not its {rows} rows")
    try:
        row_targets = decode_row_targets(record.get("row_tiers"))
    except HetcompError as err:
        raise ManifestError(f"layer {name!r}: {err}") from None
    if row_targets is None or len(row_targets) != rows or Counter(row_targets) != Counter(split):
        raise ManifestError(f"layer {name!r}: row_tiers do not give each of its {rows} rows a tier matching "
                            f"the row counts {split}")
    return row_targets
