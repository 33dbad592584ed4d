"""A task metric (top-1 accuracy by default) of a lowered model over independent hardware repeats (re-program, then
drift, each repeat).

Each repeat draws fresh programming noise and drift exponents (``program_and_drift``), seeded by
(seed, repeat) so that an evaluation is reproducible and repeat r does not depend on repeat r-1.
Repeats dominate wall time, so the evaluator:

- stages the test set on the model's device once (no DataLoader work per repeat) when it fits
  ``stage_bytes``, else streams it once per repeat (``EvaluationData``: memory stays bounded);
- runs everything before the first analog layer once and reuses those activations in every repeat
  (the digital prefix is deterministic), for as many chunks as fit ``prefix_cache_bytes`` (checked
  before each chunk is computed);
- runs without autograd, in batches sized for the device.

What is scored is a ``hetcomp.metrics.Metric`` (``metric=``: top-1 accuracy by default, a per-batch function
reduced over the data, or a whole-dataset metric such as Recall@1), on batches read by ``hetcomp.data.DataFormat``
(``(inputs, labels)`` pairs, or any batch structure with ``inputs_fn``). Labelled batches are re-chunked into
exact ``batch_size`` chunks; general batches are scored as the data gives them.

``plain_loop_accuracy`` is the straightforward loop (program, drift, iterate the loader) kept as the
reference for tests and ``bench/evaluate.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree

from hetcomp import checks, distributed
from hetcomp.data import DataFormat, move, nbytes, take_batches, tensor_pair
from hetcomp.errors import DataError
from hetcomp.graph.calls import placeholder_values, set_training
from hetcomp.lower import lowered_modules, program_and_drift
from hetcomp.lower.repeats import FoldedRunner, fold_matches, repeated_layers, why_not_vectorized
from hetcomp.metrics import ACCURACY, Metric, accuracy_labels, as_metric, split_value
from hetcomp.progress import bar, progress

__all__ = ["EvaluationData", "Evaluation", "accuracy_labels", "batched_logits", "evaluate", "hardware_repeat",
           "plain_loop_accuracy", "staged"]


@dataclass
class Evaluation:
    """The metric's value for each independent repeat at ``t_inference`` seconds after programming.

    ``accuracies`` holds the values of ``metric`` (named so for top-1 accuracy, the default; ``values`` is the
    same list); ``others``: further values a whole-dataset metric reported per repeat (e.g. MRR beside Recall@1).
    """

    accuracies: list[float]
    t_inference: float
    mac_ratio: float  # fraction of mappable-layer MACs on analog targets
    seconds: float
    method: str = "tiles"  # "vectorized" (hetcomp.lower.repeats) or "tiles (why)": one repeat at a time
    metric: str = "accuracy"
    others: dict[str, list[float]] = field(default_factory=dict)

    @property
    def values(self) -> list[float]:
        return self.accuracies

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        """Sample standard deviation over repeats (0 for one repeat)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "std": self.std, "repeats": len(self.accuracies)}

    def __str__(self) -> str:
        return (f"{self.metric} {self.mean:.4f} ± {self.std:.4f} over {len(self.accuracies)} repeats at "
                f"t = {self.t_inference:g} s; analog MAC ratio {self.mac_ratio:.3f}")


def staged(loader: Any, device: torch.device, what: str = "evaluation data") -> tuple[torch.Tensor, torch.Tensor]:
    """All (inputs, labels) of ``loader`` (or a tensor pair) concatenated on ``device``; checked: inputs
    finite, labels integer class indices (DataError naming ``what``)."""
    batches = take_batches(loader, None, what=what)
    try:
        inputs, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    except RuntimeError as error:
        raise DataError(f"{what}: batches do not concatenate ({str(error).splitlines()[0]}); every batch must "
                        "hold inputs of the same shape per sample") from None
    if len(inputs) != len(labels):
        raise DataError(f"{what}: {len(inputs)} inputs but {len(labels)} labels; pass one label per sample")
    checks.pair(what, inputs, labels, labels=True)
    return inputs.to(device), labels.to(device)


def batched_logits(module: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``module`` applied to ``inputs`` in batches (the caller sets eval mode and no_grad)."""
    return torch.cat([module(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def _frontier(gm: fx.GraphModule, stochastic: set[str]) -> fx.Node | None:
    """The first node whose result changes between repeats (a call into a lowered module)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and any(node.target == m or node.target.startswith(m + ".") for m in stochastic):
            return node
    return None


def _prefix_env(gm: fx.GraphModule, frontier: fx.Node, inputs: list[Any]) -> dict[fx.Node, Any]:
    """Values of nodes before ``frontier`` that nodes from ``frontier`` on still need."""
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    cut = order[frontier]
    needed = {node for node in gm.graph.nodes if order[node] < cut and any(order[u] >= cut for u in node.users)}
    env: dict[fx.Node, Any] = {}

    class Prefix(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            if order[node] >= cut:
                raise _Stop
            value = super().run_node(node)
            # Every prefix node goes in: Interpreter.run recomputes any node missing from its initial env.
            # Only the values later nodes read are kept; the rest are placeholders nothing reads.
            env[node] = value if node in needed else None
            return value

    try:
        Prefix(gm).run(*inputs)
    except _Stop:
        pass
    return env


class _Stop(Exception):
    pass


def _before(gm: fx.GraphModule, frontier: fx.Node) -> list[fx.Node]:
    nodes = []
    for node in gm.graph.nodes:
        if node is frontier:
            break
        nodes.append(node)
    return nodes


def _nbytes(env: dict[fx.Node, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in env.values() if isinstance(v, torch.Tensor))


class EvaluationData:
    """The evaluation set as device chunks, within a memory budget.

    Labelled data (``(inputs, labels)`` batches) is chunked into about ``batch_size`` samples; general batches
    (hetcomp.data) are chunks as the data gives them. When the data fits ``stage_bytes`` it is staged on the device
    once (for a tensor pair: views, no copy; for a loader: its batches (re-chunked) as they arrive, never the whole
    set twice). Otherwise it is streamed: every pass re-iterates the loader (or slices the tensors) and only one
    chunk is on the device at a time. Checked as it is read: finite inputs, integer labels (DataError).
    """

    def __init__(self, data: Any, device: torch.device, batch_size: int, stage_bytes: int,
                 what: str = "evaluation data", fmt: DataFormat | None = None) -> None:
        self.data, self.device, self.batch_size, self.what = data, device, batch_size, what
        self.fmt = fmt or DataFormat()
        self.tensors = tensor_pair(data)
        self.staged: list[Any] | None = None
        self._checked = False  # a loader's batches are checked on the first complete pass, not on every repeat
        if self.tensors is not None:
            inputs, labels = self.tensors
            if len(inputs) != len(labels):
                raise DataError(f"{what}: {len(inputs)} inputs but {len(labels)} labels; pass one label per sample")
            if len(labels) == 0:
                raise DataError(f"{what} is empty; pass at least one sample")
            self.fmt.check(what, (inputs, labels), labels=self.fmt.labelled((inputs, labels)))
            if _bytes(inputs, labels) <= stage_bytes:
                inputs, labels = inputs.to(device), labels.to(device)
                self.staged = [(inputs[i : i + batch_size], labels[i : i + batch_size])
                               for i in range(0, len(labels), batch_size)]
        else:
            self.staged = self._stage_loader(stage_bytes)

    @property
    def streamed(self) -> bool:
        return self.staged is None

    def chunks(self) -> Iterator[Any]:
        """The chunks on the device, in order: (inputs, labels) pairs, or general batches."""
        if self.staged is not None:
            yield from self.staged
        elif self.tensors is not None:
            inputs, labels = self.tensors
            for i in range(0, len(labels), self.batch_size):
                yield inputs[i : i + self.batch_size].to(self.device), labels[i : i + self.batch_size].to(self.device)
        else:
            for batch in self._rechunked():
                yield move(batch, self.device)

    def _stage_loader(self, stage_bytes: int) -> list[Any] | None:
        staged, total = [], 0
        for batch in self._rechunked():
            total += nbytes(batch)
            if total > stage_bytes:
                if iter(self.data) is self.data:  # a one-shot iterator cannot be read again
                    raise DataError(f"{self.what} is larger than stage_bytes={stage_bytes:,} and is a one-shot "
                                    "iterator, so it cannot be streamed once per repeat; pass a DataLoader (or "
                                    "raise stage_bytes)")
                return None  # stream it instead: the staged chunks are freed here
            staged.append(move(batch, self.device))
        if not staged:
            raise DataError(f"{self.what} yielded no batch; pass a non-empty DataLoader")
        return staged

    def _rechunked(self) -> Iterator[Any]:
        """The loader's batches, checked. Labelled ones are regrouped into chunks of exactly ``batch_size``
        samples (the last one may be smaller), so results do not depend on the loader's batch size; general ones
        (hetcomp.data) are passed on as they are: the loss and the metric see whole batches."""
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        count = index = 0
        try:
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seeds here: not the repeat's stream
                iterator = iter(self.data)
        except TypeError:
            raise DataError(f"{self.what} must be an iterable of (inputs, labels) batches or an (inputs, labels) "
                            f"tensor pair, got {type(self.data).__name__}") from None
        for index, batch in enumerate(iterator):
            if not self.fmt.labelled(batch):
                if not self._checked:
                    self.fmt.check(f"{self.what} batch {index}", batch, labels=False)
                yield batch
                continue
            if not (isinstance(batch, tuple | list) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
                    and isinstance(batch[1], torch.Tensor)):
                raise DataError(f"{self.what}: each batch must be an (inputs, labels) pair of tensors, batch {index} "
                                f"is a {type(batch).__name__} (for other batch structures pass inputs_fn= and "
                                "metric=)")
            x, y = batch[0], batch[1]
            if len(x) != len(y):
                raise DataError(f"{self.what} batch {index}: {len(x)} inputs but {len(y)} labels")
            if not self._checked:
                checks.pair(f"{self.what} batch {index}", x, y, labels=True)
            pending.append((x, y))
            count += len(y)
            if count >= self.batch_size:  # exact batch_size chunks: the same chunks as sliced tensors give
                inputs, labels = _joined(pending, self.what)
                full = count - count % self.batch_size
                for i in range(0, full, self.batch_size):
                    yield inputs[i : i + self.batch_size], labels[i : i + self.batch_size]
                pending = [(inputs[full:], labels[full:])] if full < count else []
                count -= full
        if count:
            yield _joined(pending, self.what)
        self._checked = True


def _joined(batches: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(batches) == 1:
        return batches[0]
    try:
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    except RuntimeError as error:
        raise DataError(f"{what}: batches do not concatenate ({str(error).splitlines()[0]}); every batch must "
                        "hold inputs of the same shape per sample") from None


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def evaluate(module: fx.GraphModule, report: dict[str, dict[str, Any]], data: Any, repeats: int = 20,
             t_inference: float = 86400.0, seed: int = 0, mac_ratio: float = math.nan, batch_size: int | None = None,
             prefix_cache_bytes: int = 1 << 30, stage_bytes: int = 1 << 30, exact_tiles: bool = False,
             fold_bytes: int | None = None, metric: Any = None, inputs_fn: Any = None) -> Evaluation:
    """``metric`` (top-1 accuracy by default) of the lowered ``module`` on ``data`` over ``repeats`` independent
    repeats.

    ``metric``: None (top-1 accuracy), a function ``(outputs, target) -> value`` reduced over the data, or a
    ``hetcomp.metrics.Metric`` (e.g. a whole-dataset ``DatasetMetric`` such as Recall@1). ``inputs_fn``: how a
    batch becomes model inputs (hetcomp.data.DataFormat; None: ``(inputs, labels)`` pairs, or a dict batch as
    keyword inputs); ``target`` is a labelled batch's labels, else the whole batch.

    ``batch_size`` None: 128 on CPU (measured fastest for aihwkit's elementwise-heavy tiles), 4096 on CUDA.
    Memory: the data is staged on the device when it fits ``stage_bytes``, else streamed once per repeat
    (``EvaluationData``); the digital prefix is cached chunk by chunk while the cache stays within
    ``prefix_cache_bytes`` (the limit is checked before each chunk is computed, from the first chunk's size
    per sample), the remaining chunks run whole every repeat. The data is checked (finite inputs; for accuracy,
    integer labels in range of the model's outputs: DataError).

    Repeats run vectorized by default: every lowered layer whose simulator has a repeat-vectorized forward
    (aihwkit PCM) holds R realizations drawn from its noise model and the data passes once for all R
    (hetcomp.lower.repeats; ``fold_bytes`` bounds the working set, None: 1 GiB on CPU, 8 GiB on CUDA); every output
    tensor [R*B, ...] is split into R per-repeat outputs [B, ...] and the metric runs per repeat. It leaves
    ``module`` unchanged. ``exact_tiles=True``, or a layer or graph that cannot run so (``Evaluation.method`` says
    why), runs one repeat at a time through the simulators' own modules (aihwkit's tiles: program, drift, forward),
    the reference, on a copy of ``module`` (programming overwrites tile weights): ``module`` is never changed.
    """
    repeats = checks.integer("repeats", repeats)
    exact_tiles = checks.boolean("exact_tiles", exact_tiles)
    fold_bytes = checks.integer("fold_bytes (None: 1 GiB on CPU, 8 GiB on CUDA)", fold_bytes, optional=True)
    t_inference = checks.real("t_inference (seconds after programming)", t_inference, 0.0)
    seed = checks.seed(seed)
    batch_size = checks.integer("batch_size (None: 128 on CPU, 4096 on CUDA)", batch_size, optional=True)
    prefix_cache_bytes = checks.integer("prefix_cache_bytes", prefix_cache_bytes, 0)
    stage_bytes = checks.integer("stage_bytes", stage_bytes, 0)
    metric = as_metric(metric)
    checks.callable_or_none("inputs_fn", inputs_fn, "a function batch -> model inputs")
    fmt = DataFormat(inputs_fn)
    start = time.perf_counter()
    device = next(module.parameters()).device
    batch_size = batch_size if batch_size is not None else (4096 if device.type == "cuda" else 128)
    source = EvaluationData(data, device, batch_size, stage_bytes, fmt=fmt)
    stochastic = set(lowered_modules(report))
    was_training = module.training
    set_training(module, False)
    with torch.no_grad():  # not inference_mode: aihwkit keeps tensors made here (programmed weights)
        frontier = _frontier(module, stochastic)
        method = "exact (no analog layer)"
        if frontier is None:  # nothing stochastic: one pass gives every repeat's result
            value = _score(module, source, [], None, metric, check=True)
            local = dict.fromkeys(range(repeats), value)
        else:
            prefix_computes = any(n.op not in ("placeholder", "get_attr") for n in _before(module, frontier))
            envs = _prefix_cache(module, frontier, source, prefix_cache_bytes) if prefix_computes else []
            # Under torch.distributed each rank runs every world-th repeat (repeat r keeps its seed (seed, r))
            # and the results are gathered in order: the same values as one process.
            rank, world = distributed.rank(), distributed.world_size()
            mine = list(range(rank, repeats, world))
            lowered = lowered_modules(report)
            local, method = None, "tiles (exact_tiles=True)"
            if not exact_tiles:
                why = why_not_vectorized(module, lowered) or batch_size_read_after(module, frontier)
                local = None if why else _folded_scores(module, lowered, source, envs, mine, seed, t_inference,
                                                        fold_bytes, metric, check=rank == 0)
                method = "vectorized" if local is not None else f"tiles ({why or 'the graph does not fold repeats'})"
            if local is None:  # on a copy: programming and drift overwrite the tiles' weights
                local = _tile_scores(copy.deepcopy(module), report, source, envs, mine, seed, t_inference, rank,
                                     metric)
            if world > 1:
                gathered: list[dict[int, Any]] = [{} for _ in range(world)]
                dist.all_gather_object(gathered, local)
                local = {repeat: value for part in gathered for repeat, value in part.items()}
    set_training(module, was_training)
    values, others = [], {}
    for repeat in range(repeats):
        value, extra = split_value(metric, local[repeat])
        values.append(value)
        for name, number in extra.items():
            others.setdefault(name, []).append(number)
    return Evaluation(values, float(t_inference), mac_ratio, time.perf_counter() - start, method, metric.name,
                      others)


def _call(module: fx.GraphModule, fmt: DataFormat, batch: Any, env: dict[fx.Node, Any] | None,
          runner: fx.Interpreter | None) -> Any:
    """``module``'s outputs on ``batch``; from the cached prefix ``env`` through ``runner`` when there is one."""
    args, kwargs = fmt.inputs(batch)
    if env:
        return runner.run(*placeholder_values(module, args, kwargs), initial_env=dict(env))
    return module(*args, **kwargs)


def _tile_scores(module: fx.GraphModule, report: dict[str, dict[str, Any]], source: EvaluationData,
                 envs: list[dict[fx.Node, Any]], mine: list[int], seed: int, t_inference: float,
                 rank: int, metric: Metric = ACCURACY) -> dict[int, Any]:
    """One repeat at a time through the simulators' own modules (program, drift, run): the reference path."""
    runner = fx.Interpreter(module)
    local = {}
    for repeat in progress(mine, desc="repeats", total=len(mine)):
        with hardware_repeat(module, report, t_inference, seed, repeat):
            local[repeat] = _score(module, source, envs, runner, metric, check=repeat == rank)
    return local


def _folded_scores(module: fx.GraphModule, lowered: dict[str, Any], source: EvaluationData,
                   envs: list[dict[fx.Node, Any]], mine: list[int], seed: int, t_inference: float,
                   fold_bytes: int | None, metric: Metric, check: bool) -> dict[int, Any] | None:
    """Metric values of the repeats ``mine``, many per pass over the data (hetcomp.lower.repeats); None when the
    graph does not fold repeats (checked on the first chunk against separate runs).

    Each pass's outputs are [R*B, ...] (repeat-major): every output tensor is split into R per-repeat outputs
    [B, ...] and the metric is updated per repeat, so a per-batch metric and a whole-dataset one (whose parts
    are collected per repeat over all chunks) both see exactly what R separate runs would give them.
    The first pass runs two repeats and measures the working set per repeat and sample; later passes take as many
    repeats as fit ``fold_bytes`` (None: 1 GiB on CPU, 8 GiB on CUDA)."""
    device = next(module.parameters()).device
    budget = fold_bytes if fold_bytes is not None else (8 << 30 if device.type == "cuda" else 1 << 30)
    fmt = source.fmt
    local: dict[int, Any] = {}
    position, per_repeat_sample = 0, None
    progress_bar = bar(len(mine), "repeats (vectorized)")
    first = True
    while position < len(mine):
        if per_repeat_sample is None:
            count = min(2, len(mine))
        else:
            count = int(max(1, min(len(mine) - position, budget // max(per_repeat_sample * source.batch_size, 1))))
        chunk = mine[position : position + count]
        layers = repeated_layers(module, lowered, [_repeat_seed(seed, r) for r in chunk], t_inference)
        if first and len(chunk) >= 2:
            batch = next(iter(source.chunks()))
            flat = placeholder_values(module, *fmt.inputs(batch))
            if not flat or not _folds(module, layers, flat, envs[0] if envs else None):
                progress_bar.close()
                return None
        runner = FoldedRunner(module, layers, len(chunk))
        parts: list[list[Any]] = [[] for _ in chunk]
        samples_seen = 0
        for index, batch in enumerate(source.chunks()):
            env = envs[index] if index < len(envs) else None
            outputs = runner.run(*placeholder_values(module, *fmt.inputs(batch)),
                                 initial_env=dict(env) if env else None)
            samples, target = fmt.samples(batch), fmt.target(batch)
            per_repeat = split_repeats(outputs, len(chunk), samples)
            if per_repeat is None:
                metric.check(outputs, target)  # names what the outputs are
                raise DataError(f"evaluation: the model's outputs do not carry the batch ({samples} samples) in their "
                                "leading dimension, so hardware repeats cannot be told apart")
            if first and check:
                metric.check(per_repeat[0], target)
            for part, repeat_outputs in zip(parts, per_repeat):
                part.append(metric.update(repeat_outputs, target, samples))
            samples_seen += samples
        if samples_seen == 0:
            raise DataError("evaluation data yielded no sample")
        if per_repeat_sample is None:
            working = max((getattr(layer, "peak_bytes", 0) for layer in layers.values()), default=0)
            per_repeat_sample = max(working / (len(chunk) * source.batch_size), 1.0)
        for repeat, part in zip(chunk, parts):
            local[repeat] = metric.finish(part)
        position += len(chunk)
        progress_bar.update(len(chunk))
        first = False
    progress_bar.close()
    return local


_SIZE_OPS = (torch.ops.aten.sym_size.int, torch.ops.aten.size.default)


def batch_size_read_after(module: fx.GraphModule, frontier: fx.Node) -> str | None:
    """Why folding repeats into the batch would break ``module`` (None: no reason seen): a graph exported with
    dynamic shapes reads the batch size as a value (``sym_size(x, 0)``, a symbolic int) and nodes from the first
    analog layer on use it (``view(h, [batch, seq, heads, dim])`` in attention), but ``FoldedRunner`` folds
    tensors, not sizes, so those nodes would see B where the folded tensors hold R*B rows. Checked without running
    anything (``fold_matches`` would find it too, after drawing every layer's realizations)."""
    order = {node: index for index, node in enumerate(module.graph.nodes)}
    cut = order[frontier]
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in _SIZE_OPS or len(node.args) < 2 or node.args[1] != 0:
            continue
        pending, seen = list(node.users), set()
        while pending:  # the size, and scalars computed from it
            user = pending.pop()
            if user in seen:
                continue
            seen.add(user)
            if order[user] >= cut:
                return (f"the graph reads the batch size ({node.name}) at {user.name}, after the first analog layer; "
                        "folded repeats would change it")
            if isinstance(user.meta.get("val"), torch.SymInt | torch.SymFloat | int | float):
                pending.extend(user.users)  # a scalar computed from the size
    return None


def _folds(module: fx.GraphModule, layers: dict[str, Any], flat: list[Any],
           initial_env: dict[fx.Node, Any] | None) -> bool:
    """``fold_matches`` for a graph of any number of inputs: it takes the first placeholder's value positionally,
    so a graph with several inputs is checked with the others bound in a prefix environment."""
    if len(flat) == 1:
        return fold_matches(module, layers, flat[0], initial_env)
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
    env = dict(initial_env) if initial_env else {}
    for node, value in zip(placeholders[1:], flat[1:]):
        env.setdefault(node, value)
    return fold_matches(module, layers, flat[0], env)


def split_repeats(outputs: Any, repeats: int, samples: int) -> list[Any] | None:
    """``outputs`` of a folded run (every tensor [R*B, ...], repeat-major) as R per-repeat outputs ([B, ...], the
    same structure). A tensor with B rows (a digital branch the repeats share) is every repeat's; a tensor with
    neither (no batch dimension) is shared too. None when no tensor carries R*B rows and R > 1 (nothing folded
    where something must be) or the outputs hold no tensor."""
    leaves, spec = pytree.tree_flatten(outputs)
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return None
    folded = repeats * samples
    if repeats > 1 and not any(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == folded for x in leaves):
        return None
    split = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == folded:
            split.append(leaf.reshape(repeats, samples, *leaf.shape[1:]).unbind(0))
        else:
            split.append([leaf] * repeats)
    return [pytree.tree_unflatten([parts[r] for parts in split], spec) for r in range(repeats)]


def _score(module: fx.GraphModule, source: EvaluationData, envs: list[dict[fx.Node, Any]],
           runner: fx.Interpreter | None, metric: Metric, check: bool) -> Any:
    """``metric`` over ``source``'s chunks (one pass); chunk i starts from the cached prefix ``envs[i]`` where there
    is one. ``check``: the metric checks every chunk's outputs and target (the first pass)."""
    parts = []
    for index, batch in enumerate(source.chunks()):
        env = envs[index] if index < len(envs) else None
        outputs = _call(module, source.fmt, batch, env, runner)
        target = source.fmt.target(batch)
        if check:  # every chunk, on the first pass (for accuracy: a min/max of the labels per chunk)
            metric.check(outputs, target)
        parts.append(metric.update(outputs, target, source.fmt.samples(batch)))
    if not parts:
        raise DataError("evaluation data yielded no sample")
    return metric.finish(parts)


def _prefix_cache(module: fx.GraphModule, frontier: fx.Node, source: EvaluationData,
                  limit: int) -> list[dict[fx.Node, Any]]:
    """The digital prefix's values for the leading staged chunks, as many as fit ``limit`` bytes: a chunk is
    computed only if the cache, grown by the first chunk's bytes per sample times its size, stays within it."""
    if source.streamed or limit <= 0:
        return []
    envs: list[dict[fx.Node, Any]] = []
    used, per_sample = 0, None
    for batch in source.chunks():
        samples = source.fmt.samples(batch)
        if per_sample is not None and used + per_sample * samples > limit:
            break
        env = _prefix_env(module, frontier, placeholder_values(module, *source.fmt.inputs(batch)))
        size = _nbytes(env)
        per_sample = per_sample or size / max(samples, 1)
        if used + size > limit:
            break
        envs.append(env)
        used += size
    return envs


def _repeat_seed(seed: int, repeat: int) -> int:
    return (seed * 1_000_003 + repeat) % (2**63)


@contextlib.contextmanager
def hardware_repeat(module: torch.nn.Module, report: dict[str, dict[str, Any]], t_inference: float, seed: int,
                    repeat: int) -> Iterator[None]:
    """Repeat ``repeat``: fresh programming and drift seeded by (seed, repeat); the caller's RNG is untouched
    and the forward noise inside the block continues the same seeded stream."""
    device = next(module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_repeat_seed(seed, repeat))
        program_and_drift(module, report, t_inference)
        yield


def plain_loop_accuracy(module: torch.nn.Module, report: dict[str, dict[str, Any]], loader: Any, repeats: int,
                        t_inference: float, seed: int = 0) -> list[float]:
    """The reference loop: each repeat programs, drifts and iterates the loader (same seeds as ``evaluate``)."""
    device = next(module.parameters()).device
    set_training(module, False)
    accuracies = []
    with torch.no_grad():
        for repeat in range(repeats):
            with hardware_repeat(module, report, t_inference, seed, repeat):
                correct = total = 0
                for x, y in loader:
                    correct += int((module(x.to(device)).argmax(-1) == y.to(device)).sum())
                    total += len(y)
            accuracies.append(correct / total)
    return accuracies
