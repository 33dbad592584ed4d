"""``hetcomp.compile``: trace -> annotate -> partition -> (fine-tune) -> lower -> manifest.

compile never modifies the model it is given: it works on a deep copy (fine-tuning changes weights).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp import targets as target_registry
from hetcomp.errors import ConfigError, ManifestError
from hetcomp.evaluate import Evaluation, evaluate
from hetcomp.finetune import LAFT
from hetcomp.graph import META_KEY, trace
from hetcomp.graph.layers import mappable_nodes
from hetcomp.lower import lower_graph
from hetcomp.manifest import Manifest, decode_row_targets, fingerprint, write_atomic
from hetcomp.passes import Pass, PassManager, hessian_passes
from hetcomp.passes.base import CompileContext
from hetcomp.strategies import Strategy, resolve


class CompiledModel:
    """The result of ``hetcomp.compile``.

    ``graph``: the digital FX graph with every layer's annotation (fine-tuned weights if LAFT ran); it is
    what ONNX export writes. ``module``: the lowered model, where each layer assigned to a simulated
    target (PCM: aihwkit) runs its noisy simulation; built on first use, so a manifest-only workflow
    does not need aihwkit. ``lowering``: layer -> {module, target, simulator} for that module.
    """

    def __init__(self, graph: fx.GraphModule, manifest: Manifest, example_inputs: tuple,
                 targets: target_registry.TargetSet) -> None:
        self.graph = graph
        self.manifest = manifest
        self.example_inputs = example_inputs
        self.targets = targets
        self._lowered: tuple[fx.GraphModule, dict[str, Any]] | None = None

    def _lower(self) -> tuple[fx.GraphModule, dict[str, Any]]:
        if self._lowered is None:
            try:
                self._lowered = lower_graph(self.graph, self.targets)
            except ImportError as error:
                raise ConfigError(f"lowering needs the simulator package ({error.name}); install it with "
                                  "pip install 'hetcomp[analog]' (aihwkit)") from None
        return self._lowered

    @property
    def module(self) -> fx.GraphModule:
        return self._lower()[0]

    @property
    def lowering(self) -> dict[str, Any]:
        return self._lower()[1]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def evaluate(self, data: Any, repeats: int = 20, t_inference: float = 86400.0, seed: int | None = None,
                 batch_size: int | None = None) -> Evaluation:
        """Top-1 accuracy over ``repeats`` independent hardware repeats, each re-programmed then drifted to
        ``t_inference`` seconds (default one day), plus the analog MAC ratio. ``seed`` defaults to the
        compile seed. See hetcomp.evaluate for what makes the repeats fast.
        """
        module, report = self._lower()
        analog = {t.name for t in self.targets.analog}
        mac_ratio = sum(v for k, v in self.manifest.summary["mac_ratio"].items() if k in analog)
        return evaluate(module, report, data, repeats=repeats, t_inference=t_inference,
                        seed=self.manifest.seed if seed is None else seed, mac_ratio=mac_ratio,
                        batch_size=batch_size)

    def export_onnx(self, path: str | Path, split: bool = False) -> Path:
        """Write the digital graph as ONNX with every mapped layer's nodes tagged with its target.

        ``split=True``: ``path`` is a folder receiving one ONNX graph per contiguous partition plus
        ``partitions.json`` (see hetcomp.export).
        """
        from hetcomp.export import export_onnx, export_onnx_split

        if self.graph.meta.get(META_KEY, {}).get("frontend") == "export":
            raise ConfigError("ONNX export of a model traced with the torch.export front end is not supported yet; "
                              "export the original model with torch.onnx and use the manifest's per-layer targets")
        inputs = tuple(x.detach().cpu()[:2] if isinstance(x, torch.Tensor) else x for x in self.example_inputs)
        graph = copy.deepcopy(self.graph).cpu()  # export from a CPU copy; the compiled module stays put
        if split:
            return export_onnx_split(graph, inputs, self.manifest, path)
        return export_onnx(graph, inputs, self.manifest, path)

    def save(self, directory: str | Path, onnx: bool = True) -> Path:
        """Write ``manifest.json``, ``weights.pt`` (the compiled digital weights: a plain state dict, load it
        with ``torch.load(..., weights_only=True)``) and ``model.onnx`` (unless ``onnx=False``)."""
        directory = Path(directory)
        self.manifest.save(directory / "manifest.json")
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.graph.state_dict().items()}, buffer)
        write_atomic(directory / "weights.pt", buffer.getvalue())
        if onnx:
            self.export_onnx(directory / "model.onnx")
        return directory


def _example_inputs(example_inputs: Any, data: Any) -> tuple | dict:
    if example_inputs is not None:
        if isinstance(example_inputs, dict):  # keyword inputs (Hugging Face style)
            return example_inputs
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if data is None:
        raise ConfigError("compile needs example_inputs=(x,) or data= to trace the model")
    if isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return (data[0],)
    try:
        batch = next(iter(data))
    except (TypeError, StopIteration):
        raise ConfigError("data yielded no (inputs, targets) batch to trace with; pass example_inputs") from None
    return (batch[0],)


def compile(  # noqa: A001 - the public name the issue and users expect
    model: nn.Module,
    target: str = "pcm+digital",
    example_inputs: Any = None,
    data: Any = None,
    loss_fn: Any = None,
    strategy: str | Strategy | None = None,
    passes: Sequence[Pass] | None = None,
    finetune: LAFT | None = None,
    seed: int = 0,
    hessian: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] = (),
    frontend: str = "auto",
) -> CompiledModel:
    """Compile ``model`` for a target set.

    Pipeline: trace; when ``data`` is given, the Hessian annotation passes (``hessian`` overrides
    their settings: probes, max_iter, tol, batches, estimator, gamma, eigen_method, deflate); the user's
    ``passes`` (they run before partitioning, so they can pin layers); the strategy's partition passes; ``finetune``
    (``hetcomp.LAFT(...)``: layer-wise analog fine-tuning of the analog-assigned layers). Lowering to
    the simulators happens when ``compiled.module`` is first used. Everything is validated before any
    work: target string, strategy, pass order, data needs. ``model`` itself is never modified.
    ``example_inputs`` may be a dict of keyword inputs; ``frontend`` picks the tracer (see hetcomp.trace:
    "auto" uses torch.fx and falls back to torch.export, e.g. for Hugging Face transformers).
    """
    if finetune is not None and not isinstance(finetune, LAFT):
        raise ConfigError(f"finetune must be a hetcomp.LAFT(...), got {type(finetune).__name__}")
    target_set = target_registry.parse(target)
    chosen = resolve(strategy, target_set)
    if chosen.needs_data and data is None:
        raise ConfigError(f"strategy {chosen.name!r} needs data=<DataLoader of (inputs, labels)> (Hessian "
                          "metrics, accuracy or retraining); without data use e.g. strategy='first-last-digital' "
                          "(one analog tier) or 'pareto-po' (several)")
    if finetune is not None and data is None:
        raise ConfigError("finetune (LAFT) needs training data: pass data=<DataLoader of (inputs, labels)>")
    if hessian and data is None:
        raise ConfigError("hessian= settings given but no data= to compute the Hessian on")
    allowed = {"probes", "max_iter", "tol", "batches", "estimator", "gamma", "eigen_method", "deflate"}
    unknown = sorted(set(hessian or {}) - allowed)
    if unknown:
        raise ConfigError(f"unknown hessian setting(s) {unknown}; known: {sorted(allowed)}")
    analysis = hessian_passes(**(hessian or {})) if data is not None else []
    pipeline = [*analysis, *(passes or []), *chosen.build(target_set, finetune)]
    if finetune is not None and not chosen.trains:
        pipeline.append(finetune)
    manager = PassManager(pipeline)  # checks the order before anything runs

    inputs = _example_inputs(example_inputs, data)
    working = copy.deepcopy(model)  # passes that retrain change weights: never the caller's
    gm = trace(working, inputs, leaf_modules=leaf_modules, frontend=frontend)
    fingerprint_of_input = fingerprint(gm, working)  # before any pass changes weights
    ctx = CompileContext(targets=target_set, model=working, data=data, loss_fn=loss_fn, seed=seed)
    gm = manager.run(gm, ctx)
    ctx.invalidate_analyses()  # free the gradient graphs
    unassigned = [a.layer.name for _, a in mappable_nodes(gm) if a.assignment is None]
    if unassigned:
        raise ConfigError(f"no pass assigned layers {unassigned}; the strategy's partition pass must run last")
    manifest = Manifest.from_graph(gm, model, target_set, chosen.name, seed, ctx.records, extra=ctx.manifest_extra)
    manifest.model = fingerprint_of_input
    if "finetuned" in manager.provided:
        manifest.extra["finetuned_weights"] = fingerprint(gm, gm)["weights"]
    return CompiledModel(gm, manifest, inputs, target_set)


def apply_manifest(model: nn.Module, manifest: Manifest | str | Path, example_inputs: Any) -> CompiledModel:
    """Re-create a compiled model from a manifest without re-running analysis.

    Refuses a manifest of a different model, naming the mismatch (class, architecture, layers, weights).
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.load(manifest)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    gm = trace(model, inputs)
    found = fingerprint(gm, model)
    expected = manifest.model
    annotations = {a.layer.name: a for _, a in mappable_nodes(gm)}
    if found != expected:
        problems = []
        if found["class"] != expected.get("class"):
            problems.append(f"model class {found['class']!r} != manifest's {expected.get('class')!r}")
        names = {layer["name"] for layer in manifest.layers}
        if set(annotations) != names:
            only_manifest = sorted(names - set(annotations))
            only_model = sorted(set(annotations) - names)
            problems.append(f"layers only in the manifest: {only_manifest}, only in the model: {only_model}")
        for layer in manifest.layers:
            got = annotations.get(layer["name"])
            if got is not None and list(got.layer.weight_shape) != list(layer["shape"]):
                problems.append(f"layer {layer['name']!r} shape {list(got.layer.weight_shape)} != {layer['shape']}")
        if found["architecture"] != expected.get("architecture") and not problems:
            problems.append("architecture (traced graph or parameter shapes) differs")
        if found["weights"] != expected.get("weights"):
            problems.append("weights differ (manifest was made for other weights)")
        raise ManifestError("manifest does not match this model: " + "; ".join(problems))
    target_registry.parse(manifest.target_set)  # its targets must exist in this installation
    for layer in manifest.layers:
        annotation = annotations[layer["name"]]
        annotation.metrics = dict(layer["metrics"])
        annotation.assignment = layer["assignment"]
        annotation.reason = layer["reason"]
        annotation.row_targets = decode_row_targets(layer.get("row_tiers"))
    gm.meta[META_KEY]["applied_from_manifest"] = True
    return CompiledModel(gm, copy.deepcopy(manifest), inputs, target_registry.parse(manifest.target_set))
