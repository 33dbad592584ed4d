"""``hetcomp.compile``: trace -> annotate -> partition -> (fine-tune) -> lower -> manifest.

compile never modifies the model it is given, nor its BatchNorm statistics: it traces, analyses and
fine-tunes a deep copy in eval mode (the deployed function: running statistics, no dropout).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from hetcomp import checks, distributed
from hetcomp.data import DataFormat, first_inputs, whole_tensors
from hetcomp.errors import ConfigError, TraceError
from hetcomp.evaluate import Evaluation, evaluate
from hetcomp.graph import FRONTENDS, META_KEY, trace
from hetcomp.graph.calls import set_training
from hetcomp.graph.layers import mappable_nodes
from hetcomp.lower import lower_graph, simulator_of, target_definition
from hetcomp.manifest import Manifest, fingerprint, weights_hash
from hetcomp.metrics import Metric, as_metric
from hetcomp.partition.strategy import Strategy, resolve
from hetcomp.partition.summary import mapping_summary
from hetcomp.passes.base import ANNOTATION_PIPELINES, CompileConfig, CompileContext, Pass, PassManager
from hetcomp.storage import replace_directory, write_atomic
from hetcomp.targets.base import TargetSet
from hetcomp.targets.registry import parse as parse_targets


class CompiledModel:
    """The result of ``hetcomp.compile``.

    ``graph``: the digital FX graph with every layer's annotation (fine-tuned weights if LAFT ran); it is
    what ONNX export writes. ``module``: the lowered model, where each layer assigned to a simulated
    target (PCM: aihwkit) runs its noisy simulation; built on first use, so a manifest-only workflow
    does not need aihwkit. ``lowering``: layer -> {module, target, simulator} for that module.
    """

    def __init__(self, graph: fx.GraphModule, manifest: Manifest, example_inputs: tuple | dict[str, Any],
                 targets: TargetSet, inputs_fn: Any = None, metric: Any = None) -> None:
        self.graph = graph
        self.manifest = manifest
        self.example_inputs = example_inputs
        self.targets = targets
        self.inputs_fn, self.metric = inputs_fn, metric  # the task compile was given: evaluate's defaults
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
                 batch_size: int | None = None, stage_bytes: int = 1 << 30,
                 prefix_cache_bytes: int = 1 << 30, exact_tiles: bool = False,
                 fold_bytes: int | None = None, metric: Any = None, inputs_fn: Any = None) -> Evaluation:
        """The task metric over ``repeats`` independent hardware repeats, each re-programmed then drifted to
        ``t_inference`` seconds (default one day), plus the analog MAC ratio. ``metric`` and ``inputs_fn`` default
        to those compile was given (top-1 accuracy on (inputs, labels) batches when none was); ``Evaluation.metric``
        names what was measured. ``seed`` defaults to the compile seed. See hetcomp.evaluate for what makes the
        repeats fast (repeat-vectorized; ``exact_tiles=True`` runs aihwkit's tiles one repeat at a time, the
        reference) and what bounds their memory (``stage_bytes``, ``prefix_cache_bytes``, ``fold_bytes``).
        """
        module, report = self._lower()
        analog = {t.name for t in self.targets.analog}
        mac_ratio = sum(v for k, v in self.manifest.summary["mac_ratio"].items() if k in analog)
        return evaluate(module, report, data, repeats=repeats, t_inference=t_inference,
                        seed=self.manifest.seed if seed is None else seed, mac_ratio=mac_ratio,
                        batch_size=batch_size, stage_bytes=stage_bytes, prefix_cache_bytes=prefix_cache_bytes,
                        exact_tiles=exact_tiles, fold_bytes=fold_bytes,
                        metric=self.metric if metric is None else metric,
                        inputs_fn=self.inputs_fn if inputs_fn is None else inputs_fn)

    def export_onnx(self, path: str | Path, split: bool = False) -> Path:
        """Write the digital graph as ONNX with every mapped layer's nodes tagged with its target.

        ``split=True``: ``path`` is a folder receiving one ONNX graph per contiguous partition plus
        ``partitions.json`` (see hetcomp.export). Models traced by either front end (torch.fx, torch.export with
        keyword inputs) export; the inputs are the example inputs, cut to two samples.
        """
        from hetcomp.export import export_onnx, export_onnx_split

        def sample(x: Any) -> Any:
            return x.detach().cpu()[:2] if isinstance(x, torch.Tensor) and x.dim() else x

        if isinstance(self.example_inputs, dict):
            args, kwargs = (), {key: sample(x) for key, x in self.example_inputs.items()}
        else:
            args, kwargs = tuple(sample(x) for x in self.example_inputs), {}
        graph = copy.deepcopy(self.graph).cpu()  # export from a CPU copy; the compiled module stays put
        if split:
            return export_onnx_split(graph, args, self.manifest, path, kwargs=kwargs)
        return export_onnx(graph, args, self.manifest, path, kwargs=kwargs)

    def save(self, directory: str | Path, onnx: bool = True, split_onnx: bool = False, plots: bool = False) -> Path:
        """Write the compiled model to ``directory`` as one unit; ``hetcomp.load`` reads it back.

        The folder holds ``manifest.json``, ``weights.safetensors`` (the compiled digital weights, fine-tuned
        ones after LAFT; their hash is the manifest's ``model.compiled_weights``), ``model.onnx`` (unless
        ``onnx=False``), ``onnx/`` (one graph per partition, with ``split_onnx=True``) and the plots (with
        ``plots=True``). It is built beside ``directory`` and swapped in whole (hetcomp.storage): a reader sees
        the previous output or this one, never a mix, and nothing of the previous output is left. An
        existing non-empty folder is replaced only if an earlier save made it and nothing was added since (its
        ``.hetcomp-output`` marker); anything else, and the current folder, is refused rather than replaced.
        """
        from safetensors.torch import save as safetensors_bytes

        # Clones: safetensors refuses tensors that share storage (tied weights).
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.graph.state_dict().items()}

        def write(folder: Path) -> None:
            self.manifest.save(folder / "manifest.json")
            write_atomic(folder / "weights.safetensors", safetensors_bytes(state))
            if onnx:
                self.export_onnx(folder / "model.onnx")
            if split_onnx:
                self.export_onnx(folder / "onnx", split=True)
            if plots:
                from hetcomp import plots as plotting

                plotting.write_all(self.manifest, folder)

        # Under torch.distributed every rank holds the same compile: rank 0 writes, the others wait for it.
        if not distributed.is_main():
            dist.barrier()
            return Path(directory).resolve()
        try:
            return replace_directory(directory, write)
        finally:
            if distributed.active():
                dist.barrier()


def example_inputs_of(example_inputs: Any, data: Any = None, fmt: DataFormat | None = None) -> tuple | dict:
    """The example inputs as trace takes them: a tuple of positional inputs, or a dict of keyword inputs (any
    mapping, e.g. a tokenizer's BatchEncoding); from ``data``'s first batch when none are given."""
    if example_inputs is not None:
        if isinstance(example_inputs, Mapping):  # keyword inputs (Hugging Face style)
            return dict(example_inputs)
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if data is None:
        raise ConfigError("compile needs example_inputs=(x,) or data= to trace the model")
    return first_inputs(data, fmt=fmt)


def compile(  # noqa: A001 - the public name the issue and users expect
    model: nn.Module,
    target: str = "pcm+digital",
    example_inputs: Any = None,
    data: Any = None,
    loss_fn: Any = None,
    strategy: str | Strategy | None = None,
    passes: Sequence[Pass] | None = None,
    finetune: Pass | None = None,
    seed: int = 0,
    hessian: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] = (),
    frontend: str = "auto",
    inputs_fn: Any = None,
    metric: Any = None,
) -> CompiledModel:
    """Compile ``model`` for a target set.

    Pipeline: trace; when ``data`` is given, the Hessian annotation passes (``hessian`` overrides
    their settings: probes, max_iter, tol, batches, estimator, gamma, eigen_method, deflate); the user's
    ``passes`` (they run before partitioning, so they can pin layers); the strategy's partition passes; ``finetune``
    (a pass that provides "finetuned", e.g. ``hetcomp.LAFT(...)``: layer-wise analog fine-tuning of the
    analog-assigned layers; a strategy that retrains in its own search uses it there instead). Lowering to
    the simulators happens when ``compiled.module`` is first used. Everything is validated before any
    work (before tracing): every argument's type and range, target string, strategy, pass order, data
    needs, finite weights, and for tensor data finite inputs and integer labels (hetcomp.checks; other
    data is checked batch by batch when taken). ``model`` itself is never modified.
    ``example_inputs`` may be a dict of keyword inputs; ``frontend`` picks the tracer (see hetcomp.trace:
    "auto" uses torch.fx and falls back to torch.export, e.g. for Hugging Face transformers).

    The task (hetcomp.data, hetcomp.metrics): ``data`` yields ``(inputs, labels)`` batches by default, with
    ``loss_fn(outputs, labels)`` (default cross-entropy) and top-1 accuracy as the metric. For any other batch
    structure (a Hugging Face style dict of tensors, or anything with ``inputs_fn``) ``inputs_fn(batch)`` gives the
    model inputs (None: a dict batch is the keyword inputs), ``loss_fn(outputs, batch)`` the loss (required) and
    ``metric`` what the quality-driven passes score (LAFT's validation, mac-greedy's acceptance test, row remap):
    a function ``(outputs, batch) -> value`` reduced over the data, or a ``hetcomp.metrics.Metric`` (e.g. a
    whole-dataset Recall@1). They are also ``compiled.evaluate``'s defaults; the manifest records them
    (``extra["task"]``).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"hetcomp.compile takes a torch.nn.Module, got {checks.got(model)}")
    seed = checks.seed(seed)
    checks.callable_or_none("loss_fn", loss_fn, "a function (logits, labels) -> scalar loss, e.g. "
                            "torch.nn.functional.cross_entropy (None: cross-entropy with checked labels)")
    checks.callable_or_none("inputs_fn", inputs_fn, "a function batch -> model inputs (a tensor, a tuple of "
                            "positional inputs or a dict of keyword inputs)")
    task_metric = as_metric(metric)  # ConfigError for anything that is not a metric
    if inputs_fn is not None and loss_fn is None and data is not None:
        raise ConfigError("inputs_fn= reads batches of any structure, so the loss cannot be guessed: pass "
                          "loss_fn=<(outputs, batch) -> scalar loss>")
    fmt = DataFormat(inputs_fn)
    if finetune is not None and not (isinstance(finetune, Pass) and "finetuned" in finetune.provides):
        raise ConfigError(f"finetune must be a fine-tuning pass such as hetcomp.LAFT(...) (a Pass providing "
                          f"'finetuned'), got {checks.got(finetune)}")
    if finetune is not None:
        finetune.validate()  # again: its fields may have changed since it was made
    if hessian is not None and not isinstance(hessian, dict):
        raise ConfigError(f"hessian must be None or a dict of settings such as {{'probes': 10}}, got "
                          f"{checks.got(hessian)}")
    if passes is not None and (isinstance(passes, Pass) or not isinstance(passes, Sequence)):
        raise ConfigError(f"passes must be a list of hetcomp Pass objects, got {checks.got(passes)}; wrap one "
                          "pass in a list: passes=[my_pass]")
    if isinstance(leaf_modules, str | type) or not isinstance(leaf_modules, Sequence) or \
            not all(isinstance(m, str | type) for m in leaf_modules):
        raise ConfigError(f"leaf_modules must be a list of module names (str) or classes, got "
                          f"{checks.got(leaf_modules)}")
    checks.choice("frontend", frontend, FRONTENDS)
    target_set = parse_targets(target)
    for each in target_set:  # a target's device parameters, checked by its simulator before any work
        simulator = simulator_of(each)
        if simulator is not None:
            simulator.check(each)
    chosen = resolve(strategy, target_set)
    if chosen.needs_data and data is None:
        raise ConfigError(f"strategy {chosen.name!r} needs data=<DataLoader of (inputs, labels)> (Hessian "
                          "metrics, accuracy or retraining); without data use e.g. strategy='first-last-digital' "
                          "(one analog tier) or 'pareto-po' (several)")
    if finetune is not None and data is None:
        raise ConfigError("finetune (LAFT) needs training data: pass data=<DataLoader of (inputs, labels)>")
    if hessian and data is None:
        raise ConfigError("hessian= settings given but no data= to compute the Hessian on")
    allowed = {"probes", "max_iter", "tol", "batches", "estimator", "gamma", "eigen_method", "deflate",
               "deflate_bytes"}
    unknown = sorted(set(hessian or {}) - allowed)
    if unknown:
        raise ConfigError(f"unknown hessian setting(s) {unknown}; known: {sorted(allowed)}")
    analysis = ANNOTATION_PIPELINES.get("hessian")(**(hessian or {})) if data is not None else []
    pipeline = [*analysis, *(passes or []), *chosen.build(target_set, finetune)]
    if finetune is not None and not chosen.trains:
        pipeline.append(finetune)
    manager = PassManager(pipeline)  # checks the order before anything runs
    checks.finite_parameters(model)
    whole = whole_tensors(data)
    if whole is not None:  # tensor data: checked whole now; other data batch by batch when taken
        fmt.check("data", whole, labels=loss_fn is None)

    inputs = example_inputs_of(example_inputs, data, fmt)
    working = copy.deepcopy(model)  # never the caller's model (nor its BatchNorm statistics)
    set_training(working, False)
    gm = trace(working, inputs, leaf_modules=leaf_modules, frontend=frontend)
    fingerprint_of_input = fingerprint(gm, working)  # before any pass changes weights
    # Under torch.distributed (torchrun + init_process_group) the Hessian passes shard their batches over the
    # ranks; every rank computes the same metrics and the same manifest.
    ctx = CompileContext(CompileConfig(target_set, seed=seed, loss_fn=loss_fn, process_group=distributed.group(),
                                       inputs_fn=inputs_fn, metric=metric), model=working, data=data)
    gm = manager.run(gm, ctx)
    ctx.analyses.invalidate()  # free the gradient graphs
    set_eval(gm)
    unassigned = [a.layer.name for _, a in mappable_nodes(gm) if a.assignment is None]
    if unassigned:
        raise ConfigError(f"no pass assigned layers {unassigned}; the strategy's partition pass must run last")
    model_record = {**fingerprint_of_input, "compiled_weights": weights_hash(gm),
                    "frontend": gm.meta[META_KEY]["frontend"], "leaf_modules": leaf_module_names(leaf_modules)}
    ctx.manifest_extra["task"] = task_record(inputs_fn, loss_fn, task_metric)
    manifest = build_manifest(gm, model_record, target_set, chosen.name, seed, ctx)
    return CompiledModel(gm, manifest, inputs, target_set, inputs_fn=inputs_fn, metric=metric)


def task_record(inputs_fn: Any, loss_fn: Any, metric: Metric) -> dict[str, Any]:
    """What the manifest records of the task: how batches were read, the loss and the metric (by name)."""
    def name(fn: Any) -> str:
        qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{qualname}"

    return {"inputs": "(inputs, labels) pairs, or a dict batch as keyword inputs" if inputs_fn is None
            else name(inputs_fn),
            "loss": "cross-entropy" if loss_fn is None else name(loss_fn),
            "metric": metric.name, "higher_is_better": metric.higher_is_better}


def build_manifest(gm: fx.GraphModule, model_record: dict[str, Any], target_set: TargetSet,
                   strategy: str, seed: int, ctx: CompileContext) -> Manifest:
    """The manifest of a compiled graph: records, each target's whole definition, the derived summary."""
    from hetcomp import __version__

    layers = Manifest.layer_records(gm)
    return Manifest(
        model=model_record, target_set=str(target_set), targets=[target_definition(t) for t in target_set],
        strategy=strategy, seed=seed, layers=layers, summary=mapping_summary(layers, list(target_set)),
        calibration=ctx.calibration_record() or None, passes=[vars(r) for r in ctx.records],
        extra=ctx.manifest_extra, hetcomp_version=__version__,
    )


def leaf_module_names(leaf_modules: Sequence[type | str]) -> list[str]:
    """Leaf modules as recorded in the manifest: names as given, types by qualified name."""
    return [m if isinstance(m, str) else f"{m.__module__}.{m.__qualname__}" for m in leaf_modules]


def set_eval(gm: nn.Module) -> None:
    """Eval mode for analyses, evaluation and export (a torch.export graph too: hetcomp.graph.calls)."""
    set_training(gm, False)
