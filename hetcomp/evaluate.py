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

``RepeatRunner`` is the one loop over hardware repeats (vectorized where the graph folds them, else one repeat
at a time): ``evaluate``, ``repeat_outputs`` (every sample's outputs per repeat), ``hetcomp.stats.correctness``
and the curvature study (hetcomp.curvature.failures) all run their repeats through it.

``HETCOMP_EXACT_TILES=1`` in the environment sends every evaluation of the process (LAFT validation, mac-greedy
trials, row remap, the curvature study, ``evaluate``) through aihwkit's tiles, as ``exact_tiles=True`` does for one
call: for checking a whole pipeline against the reference when the vectorized periphery is suspected, and for
timing the pipelines both ways (bench/pipeline_timing.py).

``plain_loop_accuracy`` is the straightforward loop (program, drift, iterate the loader) kept as the
reference for tests and ``bench/evaluate.py``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from hetcomp import checks, distributed
from hetcomp.data import DataFormat, move, nbytes, take_batches, tensor_pair
from hetcomp.errors import ConfigError, DataError
from hetcomp.graph.calls import placeholder_values, set_training
from hetcomp.lower import lowered_modules, program_and_drift
from hetcomp.lower.repeats import (
    FoldedRunner,
    chunk_seed,
    folds,
    programmed_states,
    repeated_layers,
    seed_draws,
    why_not_vectorized,
)
from hetcomp.metrics import Metric, accuracy_labels, as_metric, split_value
from hetcomp.progress import bar, progress

__all__ = ["EvaluationData", "Evaluation", "RepeatChunk", "RepeatRunner", "accuracy_labels", "batched_logits",
           "evaluate", "hardware_repeat", "plain_loop_accuracy", "repeat_outputs", "staged"]

T = TypeVar("T")
_NO_BATCH = object()  # an empty loader's first batch
# Set to 1 to run every evaluation of the process on the tiles (the module docstring).
EXACT_TILES_VARIABLE = "HETCOMP_EXACT_TILES"


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
        self._count: int | None = None  # chunks of a streamed loader, once counted
        self._weights: list[float] | None = None  # chunk_weights, once computed
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
        for _, batch in self.indexed_chunks():
            yield batch

    def indexed_chunks(self, indices: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
        """(index, chunk on the device) for the chunks ``indices`` (None: all), in order. A streamed loader is read
        up to the last chunk asked for; chunks outside ``indices`` are not moved to the device."""
        if indices is not None and len(indices) == 0:
            return
        last = None if indices is None else indices[-1]
        if self.staged is not None:
            for index, batch in enumerate(self.staged):
                if indices is None or index in indices:
                    yield index, batch
        elif self.tensors is not None:
            inputs, labels = self.tensors
            for index, i in enumerate(range(0, len(labels), self.batch_size)):
                if indices is None or index in indices:
                    yield index, (inputs[i : i + self.batch_size].to(self.device),
                                  labels[i : i + self.batch_size].to(self.device))
        else:
            for index, batch in enumerate(self._rechunked()):
                if indices is None or index in indices:
                    yield index, move(batch, self.device)
                if last is not None and index >= last:
                    break

    def chunk_weights(self) -> list[float]:
        """Each chunk's relative cost, for dealing chunks to ranks and sizing groups of repeats: a staged chunk's
        bytes, a streamed tensor chunk's samples; a streamed loader's chunks (not read ahead) count alike."""
        if self._weights is None:
            if self.staged is not None:
                self._weights = [float(max(nbytes(batch), 1)) for batch in self.staged]
            elif self.tensors is not None:
                samples = len(self.tensors[1])
                self._weights = [float(min(self.batch_size, samples - start))
                                 for start in range(0, samples, self.batch_size)]
            else:
                self._weights = [1.0] * self.chunk_count()
        return self._weights

    def chunk_count(self) -> int:
        """How many chunks ``chunks()`` yields (a streamed loader is read once to count them, then remembered)."""
        if self.staged is not None:
            return len(self.staged)
        if self.tensors is not None:
            return math.ceil(len(self.tensors[1]) / self.batch_size)
        if self._count is None:
            self._count = sum(1 for _ in self._rechunked())
        return self._count

    def _stage_loader(self, stage_bytes: int) -> list[Any] | None:
        staged, total = [], 0
        for batch in self._rechunked():
            total += nbytes(batch)
            if total > stage_bytes:
                if isinstance(self.data, Iterator):  # a one-shot iterator cannot be read again (asked without iter():
                    # a DataLoader's iter() draws from the caller's RNG)
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
            # A DataLoader draws its seeds (a shuffling sampler's, at the first batch) from torch's RNG: here from a
            # fixed seed, so the caller's stream is untouched and the chunks are the same on every rank and pass
            # (ranks score their shares of one chunk order).
            with torch.random.fork_rng(devices=[]):
                seed_draws(0, torch.device("cpu"))  # the CPU's generator alone: fork_rng keeps only its state
                iterator = iter(self.data)
                first = next(iterator, _NO_BATCH)
        except TypeError:
            raise DataError(f"{self.what} must be an iterable of (inputs, labels) batches or an (inputs, labels) "
                            f"tensor pair, got {type(self.data).__name__}") from None
        batches = iterator if first is _NO_BATCH else itertools.chain([first], iterator)
        for index, batch in enumerate(batches):
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
    Both paths are ``RepeatRunner``'s.

    Under torch.distributed (N ranks, every rank passing the same arguments) the work is split and every rank
    returns the same Evaluation, one process's, bit for bit. The work is the pairs (group of repeats, data chunk) of
    ``RepeatRunner``, group-major, cut into N contiguous shares of about equal cost; rank k runs the k-th, and
    the ranks that share a group of repeats draw its programming in parts and exchange them. The metric's parts
    (``Metric.update``'s values, per repeat and chunk) are gathered and finished in chunk order on every rank:
    per-batch and whole-dataset metrics alike. A pair computes the same on any rank: repeat r is programmed and
    drifted from the seed (seed, r), its forward noise restarts per chunk from (seed, r, chunk), and the groups of
    repeats folded together do not depend on N (on CUDA the folded batch's size picks the matrix kernels, and so the
    rounding). With more ranks than pairs some ranks idle. This holds where every forward noise follows torch's
    seeds: the repeat-vectorized layers restart theirs per chunk (``at_chunk``; a third-party simulator's without it
    draws on), and on the tile path torch's RNG is reseeded per chunk, which aihwkit's C++ tiles (``tile='cpp'``) do
    not read. A shuffling DataLoader is read in one fixed order (``EvaluationData``).
    An error on any rank is raised on every rank.
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
    rank, world = distributed.rank(), distributed.world_size()
    # Without an analog layer one pass gives every repeat's value: every rank runs it whole.
    spread = world > 1 and _frontier(module, set(lowered_modules(report))) is not None

    def run() -> tuple[str, dict[int, Any]]:
        runner = RepeatRunner(module, report, source, range(repeats), seed, t_inference, exact_tiles=exact_tiles,
                              fold_bytes=fold_bytes, prefix_cache_bytes=prefix_cache_bytes,
                              share=(rank, world) if spread else None, check=metric.check)
        return runner.method, _metric_by_repeat(runner, metric, finish=not spread)

    if not spread:
        method, local = run()
    else:  # {repeat: {chunk index: part}} from every rank, finished in chunk order
        results = _on_every_rank(run)
        method = results[0][0]
        merged: dict[int, dict[int, Any]] = {repeat: {} for repeat in range(repeats)}
        for _, parts in results:
            for repeat, by_chunk in parts.items():
                merged[repeat].update(by_chunk)
        local = {repeat: _finished(metric, merged[repeat]) for repeat in range(repeats)}  # parts where made
    values, others = [], {}
    for repeat in range(repeats):
        value, extra = split_value(metric, local[repeat])
        values.append(value)
        for name, number in extra.items():
            others.setdefault(name, []).append(number)
    return Evaluation(values, float(t_inference), mac_ratio, time.perf_counter() - start, method, metric.name,
                      others)


def _on_every_rank(work: Callable[[], T]) -> list[T]:
    """``work()`` here, and every rank's result in rank order on every rank. An error on any rank is raised on
    every rank (the lowest failing rank's), so no rank waits in the gather for a peer that failed."""
    try:
        payload: tuple[str, Any] = ("ok", work())
    except Exception as error:  # noqa: BLE001 - handed to every rank and raised there and here
        payload = ("error", distributed._portable(error))
    gathered = distributed.all_gather_tree(payload)  # the parts' tensors (embeddings) through the backend
    for status, value in gathered:
        if status == "error":
            raise value
    return [value for _, value in gathered]


def _finished(metric: Metric, parts: dict[int, Any]) -> Any:
    """``metric.finish`` of one repeat's parts, in chunk order."""
    return metric.finish([parts[index] for index in sorted(parts)])


def _metric_by_repeat(runner: RepeatRunner, metric: Metric, finish: bool) -> dict[int, Any]:
    """Per repeat of ``runner``: the metric's value (``finish``), or its parts by chunk index (to be gathered
    from several ranks and finished there). A repeat is finished as soon as its group of repeats has seen every
    chunk, so at most one group's parts are held."""
    fmt = runner.source.fmt
    results: dict[int, Any] = {}
    pending: dict[int, dict[int, Any]] = {}
    group: list[int] | None = None

    def close() -> None:
        for repeat, parts in pending.items():
            results[repeat] = _finished(metric, parts) if finish else parts
        pending.clear()

    for chunk in runner:
        if chunk.repeats != group:
            close()
            group = chunk.repeats
        target, samples = fmt.target(chunk.batch), fmt.samples(chunk.batch)
        for repeat, outputs in chunk.per_repeat()[:1] if chunk.shared else chunk.per_repeat():
            pending.setdefault(repeat, {})[chunk.index] = metric.update(outputs, target, samples)
    close()
    if runner.shared:  # one pass was scored (under the first repeat): it is every repeat's
        results = dict.fromkeys(runner.repeats, results[runner.repeats[0]])
    return results


@contextlib.contextmanager
def _evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside the block; ``module``'s training flag is restored after it."""
    was_training = module.training
    set_training(module, False)
    try:
        with torch.no_grad():  # not inference_mode: aihwkit keeps tensors made here (programmed weights)
            yield
    finally:
        set_training(module, was_training)


def _call(module: fx.GraphModule, fmt: DataFormat, batch: Any, env: dict[fx.Node, Any] | None,
          runner: fx.Interpreter | None) -> Any:
    """``module``'s outputs on ``batch``; from the cached prefix ``env`` through ``runner`` when there is one."""
    args, kwargs = fmt.inputs(batch)
    if env:
        return runner.run(*placeholder_values(module, args, kwargs), initial_env=dict(env))
    return module(*args, **kwargs)


@dataclass
class RepeatChunk:
    """One data chunk's model outputs for a group of hardware repeats: what iterating a ``RepeatRunner`` gives."""

    repeats: list[int]
    index: int  # the chunk's position in the data (EvaluationData's order)
    batch: Any  # the chunk, on the device
    outputs: list[Any]  # the model's outputs on ``batch``, one per repeat of ``repeats`` (one for all: ``shared``)
    shared: bool = False  # no analog layer: ``outputs[0]`` is every repeat's

    def per_repeat(self) -> list[tuple[int, Any]]:
        """(repeat, outputs) for every repeat of the chunk."""
        if self.shared:
            return [(repeat, self.outputs[0]) for repeat in self.repeats]
        return list(zip(self.repeats, self.outputs, strict=True))


class RepeatRunner:
    """The lowered ``module`` run over hardware repeats, data chunk by data chunk: iterating it yields every
    ``RepeatChunk`` (a chunk's outputs for a group of repeats). The one loop behind ``evaluate``,
    ``repeat_outputs``, ``hetcomp.stats.correctness`` and the curvature study, so all run the same repeats alike.

    Repeat r is programmed and drifted from the seed (seed, r), whichever path runs and however repeats are
    grouped. The path is chosen on construction and named by ``method``:

    - "vectorized": every lowered layer holds the realizations of a group of repeats and each chunk passes once
      for the group (hetcomp.lower.repeats); groups of repeats follow one another, each over its chunks. The groups
      are equal (the last may be smaller), as large as ``fold_bytes`` allows (None: 1 GiB on CPU, 8 GiB on CUDA),
      by the working set per repeat measured on the data's first chunk with two repeats folded (once per module and
      input shapes: ``_fold_probe``). Every output tensor [R*B, ...] is split into the R per-repeat outputs
      [B, ...] (``split_repeats``).
    - "tiles (why)": ``exact_tiles=True``, a layer without a repeat-vectorized forward, or a graph that does not
      fold repeats (checked on the first chunk against separate runs when ``probe_folding``; None: when there are
      two repeats or more): one repeat at a time through the simulators' modules (program, drift, every chunk) on
      a copy of ``module``.
    - "exact (no analog layer)": one pass; every repeat shares its outputs (``RepeatChunk.shared``).

    Each chunk's forward noise starts afresh (seeded by the repeat and the chunk: ``at_chunk``, and on the tile path
    torch's RNG), so a (repeat, chunk) output does not depend on what ran before it. ``share=(rank, world)`` runs only
    that rank's contiguous share of the (group, chunk) pairs, in group-major order, the shares of about equal cost
    (None: all of them): the groups do not depend on ``share``, so every pair is computed as one process computes
    it, bit for bit also on CUDA (where the folded batch's size picks the matrix kernels and so the rounding). Ranks
    that share a group draw its programming in parts and exchange them (``_draw_shared``, ``_exchange``).

    ``module`` is never changed (its training flag is restored). ``check(outputs, target)`` runs on every chunk of the
    first pass (e.g. ``Metric.check``). The digital prefix (everything before the first analog layer) is computed
    once per chunk and reused by every repeat, for as many chunks as fit ``prefix_cache_bytes``.
    """

    def __init__(self, module: fx.GraphModule, report: dict[str, dict[str, Any]], source: EvaluationData,
                 repeats: Iterable[int], seed: int, t_inference: float, *, exact_tiles: bool = False,
                 fold_bytes: int | None = None, prefix_cache_bytes: int = 1 << 30,
                 share: tuple[int, int] | None = None, check: Callable[[Any, Any], None] | None = None,
                 probe_folding: bool | None = None) -> None:
        if not isinstance(module, fx.GraphModule):
            raise ConfigError(f"running hardware repeats needs the lowered fx.GraphModule (compiled.module), got "
                              f"{type(module).__name__}")
        self.module, self.report, self.source = module, report, source
        self.repeats, self.seed, self.t_inference = list(repeats), seed, t_inference
        self.fold_bytes, self.share, self.check = fold_bytes, share, check
        self.per_repeat_bytes: float | None = None  # working set per repeat of a fold (the probe's measure)
        self.lowered = lowered_modules(report)
        self.frontier = _frontier(module, set(self.lowered))
        self.envs: dict[int, dict[fx.Node, Any]] = {}
        self.work: list[tuple[list[int], range | None]] = []  # (group of repeats, its chunks here; None: all)
        # Groups this rank runs with other ranks: their repeat-vectorized layers, built up front from the parts of
        # their programming the ranks drew (``_draw_shared``, ``_exchange``).
        self._shared_layers: dict[tuple[int, ...], dict[str, Any]] = {}
        self._probe_layers: dict[str, Any] | None = None  # the fold probe's realizations of repeats[:2]
        self._prefix_cache_bytes = prefix_cache_bytes
        if self.frontier is None:
            self.method = "exact (no analog layer)"
            return
        # Whether anything runs before the first analog layer (its values are cached per chunk: ``envs``).
        self._prefix = any(n.op not in ("placeholder", "get_attr") for n in _before(module, self.frontier))
        # Ranks exchange programming below: every rank first agrees that every rank got that far, so an error on
        # one rank (the probe, a draw) is raised on all of them instead of leaving the others waiting.
        exchanging = (share is not None and distributed.active() and distributed.world_size() == share[1]
                      and distributed.rank() == share[0])
        failure: Exception | None = None
        groups: list[list[int]] = []
        owners: list[list[int]] | None = None
        parts: list[tuple[list[int], list[int], list[int], dict[str, list[torch.Tensor]]]] = []
        try:
            with _evaluation_mode(module):
                if exact_tiles or os.environ.get(EXACT_TILES_VARIABLE, "0") == "1":
                    why: str | None = "exact_tiles=True" if exact_tiles else f"{EXACT_TILES_VARIABLE}=1"
                else:
                    why = why_not_vectorized(module, self.lowered)
                    probe = len(self.repeats) >= 2 if probe_folding is None else probe_folding
                    if why is None and len(self.repeats) >= 2 and not self._fold_probe(check_folding=probe):
                        why = "the graph does not fold repeats"
                self.method = "vectorized" if why is None else f"tiles ({why})"
                groups = self._groups()
                owners = None if self.share is None else self._owners(groups)
                self.work = self._dealt(groups, owners)
                if exchanging and self.method == "vectorized":
                    parts = self._draw_shared(groups, owners)
                span = None if share is None else sorted({index for _, chunks in self.work for index in chunks})
                if self._prefix:  # (the first chunk's may be known from the fold probe)
                    self.envs = _prefix_cache(module, self.frontier, source, prefix_cache_bytes, span, self.envs)
        except Exception as error:
            if not exchanging:
                raise
            failure = error
        if exchanging:
            self._agree(failure, groups, owners)
            if self.method == "vectorized":  # every rank makes the groups of ranks that will exchange, in plan order
                distributed.make_peer_groups(sharers for sharers in map(_sharers, owners) if len(sharers) > 1)
            with _evaluation_mode(module):
                self._exchange(parts)

    def _groups(self) -> list[list[int]]:
        """The repeats in groups folded together: equal groups within the working-set budget (one repeat each on
        the tile path). They depend on the repeats, the budget and the data alone, never on ``share``."""
        if self.method != "vectorized" or self.per_repeat_bytes is None:
            return [[repeat] for repeat in self.repeats] if self.method != "vectorized" else [list(self.repeats)]
        device = next(self.module.parameters()).device
        budget = self.fold_bytes if self.fold_bytes is not None else (8 << 30 if device.type == "cuda" else 1 << 30)
        fit = int(max(1, budget // self.per_repeat_bytes))
        total = len(self.repeats)
        count = -(-total // fit)
        bounds = [-(-index * total // count) for index in range(count + 1)]  # sizes differ by one at most
        return [self.repeats[bounds[index] : bounds[index + 1]] for index in range(count)]

    def _dealt(self, groups: list[list[int]], owners: list[list[int]] | None
               ) -> list[tuple[list[int], range | None]]:
        """This rank's (group, chunks) work: all of it without ``share``; else the pairs ``owners`` (``_owners``)
        gives it (a range of chunks per group)."""
        if owners is None:
            return [(group, None) for group in groups if group]
        work = []
        for group, row in zip(groups, owners, strict=True):
            mine = [index for index, owner in enumerate(row) if owner == self.share[0]]
            if mine:
                work.append((group, range(mine[0], mine[-1] + 1)))
        return work

    def _owners(self, groups: list[list[int]]) -> list[list[int]]:
        """Per group, per chunk: the rank that runs the pair. The (group, chunk) pairs in group-major order are cut
        into ``world`` contiguous shares of about equal cost, a pair costing its group's size times its chunk's
        bytes (``EvaluationData.chunk_weights``: padded token batches differ in length), each pair going to the
        share its cost's midpoint falls in. The same on every rank (the same data)."""
        world = self.share[1]
        weights = self.source.chunk_weights()
        costs = [len(group) * weight for group in groups for weight in weights]
        total = sum(costs)
        owners, before = [], 0.0
        for cost in costs:
            owners.append(min(world - 1, int(world * (before + cost / 2) / total)))
            before += cost
        return [owners[index * len(weights) : (index + 1) * len(weights)] for index in range(len(groups))]

    def _seeds(self, repeats: list[int]) -> list[int]:
        """The seeds of ``repeats`` (``_repeat_seed``): what their realizations are drawn from, wherever they are."""
        return [_repeat_seed(self.seed, repeat) for repeat in repeats]

    def _reuses_probe(self, group: list[int]) -> bool:
        """Whether ``group`` runs on the fold probe's realizations (held where the probe ran: not after a cached
        probe)."""
        return self._probe_layers is not None and group == self.repeats[:2]

    def _draw_shared(self, groups: list[list[int]], owners: list[list[int]]
                     ) -> list[tuple[list[int], list[int], list[int], dict[str, list[torch.Tensor]]]]:
        """This rank's part of the programming of each group whose chunks several ranks run, as (group, its ranks,
        their parts' sizes, this rank's part's programmed states). The ranks split a group's repeats into
        contiguous parts, one each, so no rank draws the whole group; ``_exchange`` joins them. A repeat's state
        comes from its seed alone (``Simulator.programs``), so the parts join to what one process draws."""
        rank = self.share[0]
        parts = []
        for group, row in zip(groups, owners, strict=True):
            sharers = _sharers(row)
            # Whether a group is drawn in parts follows from the plan alone (the same on every rank), never from what
            # a rank holds: a rank whose probe was cached holds no probe realizations to reuse.
            if len(sharers) < 2 or rank not in sharers:
                continue
            bounds = [index * len(group) // len(sharers) for index in range(len(sharers) + 1)]
            place = sharers.index(rank)
            state = programmed_states(self.module, self.lowered, self._seeds(group[bounds[place] : bounds[place + 1]]),
                                      self.t_inference)
            parts.append((group, sharers, [bounds[i + 1] - bounds[i] for i in range(len(sharers))], state))
        return parts

    def _agree(self, failure: Exception | None, groups: list[list[int]], owners: list[list[int]] | None) -> None:
        """Every rank's outcome so far: the lowest failing rank's error is raised on every rank; ranks that planned
        other work (another path, other groups or other shares: other data or arguments on some rank) raise alike."""
        plan = (self.method if failure is None else None, groups, owners)
        outcomes = distributed.all_agree(("error", distributed._portable(failure)) if failure is not None
                                         else ("ok", plan))
        for status, value in outcomes:
            if status == "error":
                raise value
        if any(value != outcomes[0][1] for _, value in outcomes):
            raise ConfigError("the ranks planned different evaluations (path, groups of repeats or shares of the data "
                              "differ between ranks); every rank must pass the same model, data and arguments")

    def _exchange(self, parts: list[tuple[list[int], list[int], list[int], dict[str, list[torch.Tensor]]]]) -> None:
        """Join each shared group's parts over its ranks (``distributed.share_rows``, an all-gather over them, in group
        order: the ranks sharing a group meet there whatever else they run first) and build the group's layers at
        once, so a group waiting for its turn (the last of this rank's share) holds its realizations, not the
        programmed stacks they were drawn from."""
        # An error here (out of memory joining the parts) is not agreed on: peers may wait in their next exchange.
        if tuple(self.repeats[:2]) in {tuple(group) for group, *_ in parts}:
            self._probe_layers = None  # that group runs on the exchanged realizations
        for group, sharers, counts, state in parts:
            joined = iter(distributed.share_rows([t for name in state for t in state[name]], counts, sharers))
            programmed = {name: [next(joined) for _ in tensors] for name, tensors in state.items()}
            self._shared_layers[tuple(group)] = repeated_layers(
                self.module, self.lowered, self._seeds(group), self.t_inference, programmed)

    @classmethod
    def on_inputs(cls, module: fx.GraphModule, report: dict[str, dict[str, Any]], inputs: torch.Tensor,
                  repeats: int, t_inference: float = 86400.0, seed: int = 0, batch_size: int | None = None,
                  exact_tiles: bool = False, fold_bytes: int | None = None) -> RepeatRunner:
        """A runner over one input tensor [N, ...] (one positional model input) in chunks of ``batch_size``
        (None: 128 on CPU, 4096 on CUDA), for the repeats 0 .. ``repeats`` - 1."""
        repeats = checks.integer("repeats", repeats)
        batch_size = checks.integer("batch_size (None: 128 on CPU, 4096 on CUDA)", batch_size, optional=True)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
            raise DataError(f"inputs must be a tensor [samples, ...], got {checks.got(inputs)}")
        device = next(module.parameters()).device
        batch_size = batch_size if batch_size is not None else (4096 if device.type == "cuda" else 128)
        # The data as (inputs, sample index) pairs: chunked like any labelled data; the indices are not used.
        indices = torch.arange(len(inputs), device=inputs.device)
        source = EvaluationData((inputs, indices), device, batch_size, stage_bytes=1 << 62, what="inputs")
        return cls(module, report, source, range(repeats), seed, t_inference, exact_tiles=exact_tiles,
                   fold_bytes=fold_bytes)

    @property
    def shared(self) -> bool:
        """Whether every repeat gives the same outputs (no analog layer)."""
        return self.frontier is None

    def stacked(self) -> torch.Tensor:
        """Every repeat's outputs over the chunks run, [repeats, samples, ...] on the CPU (rows in ``repeats``
        order); the model's outputs must be one tensor."""
        rows: dict[int, list[torch.Tensor]] = {repeat: [] for repeat in self.repeats}
        for chunk in self:
            for repeat, outputs in chunk.per_repeat():
                if not isinstance(outputs, torch.Tensor):
                    raise DataError(f"stacking outputs needs a model that returns one tensor, this one returns a "
                                    f"{type(outputs).__name__}")
                rows[repeat].append(outputs.cpu())
        return torch.stack([torch.cat(rows[repeat]) for repeat in self.repeats])

    def __iter__(self) -> Iterator[RepeatChunk]:
        was_training = self.module.training
        set_training(self.module, False)
        try:
            if self.shared:
                yield from self._shared()
            elif self.method == "vectorized":
                yield from self._folded()
            else:
                yield from self._tiles()
        finally:
            set_training(self.module, was_training)

    def _chunks(self, indices: range | None = None) -> Iterator[tuple[int, Any]]:
        return self.source.indexed_chunks(indices)

    def _checked(self, outputs: Any, batch: Any) -> None:
        if self.check is not None:
            self.check(outputs, self.source.fmt.target(batch))

    def _no_sample(self, seen: int) -> None:
        if seen == 0 and self.share is None:  # a share may hold no chunk: another rank has them
            raise DataError("evaluation data yielded no sample")

    @torch.no_grad()
    def _shared(self) -> Iterator[RepeatChunk]:
        seen = 0
        for index, batch in self._chunks():
            outputs = _call(self.module, self.source.fmt, batch, None, None)
            self._checked(outputs, batch)
            seen += self.source.fmt.samples(batch)
            yield RepeatChunk(list(self.repeats), index, batch, [outputs], shared=True)
        self._no_sample(seen)

    @torch.no_grad()
    def _tiles(self) -> Iterator[RepeatChunk]:
        """One repeat at a time on a copy (programming and drift overwrite the tiles' weights); the cached prefix
        values are re-keyed to the copy's nodes. Each chunk's forward noise comes from torch's RNG seeded by the
        repeat and the chunk."""
        copied = copy.deepcopy(self.module)
        nodes = {node.name: node for node in copied.graph.nodes}
        envs = {index: {nodes[node.name]: value for node, value in env.items()} for index, env in self.envs.items()}
        runner = fx.Interpreter(copied)
        device = next(copied.parameters()).device
        for position, (group, indices) in enumerate(progress(self.work, desc="repeats", total=len(self.work))):
            (repeat,) = group
            with hardware_repeat(copied, self.report, self.t_inference, self.seed, repeat):
                seen = 0
                for index, batch in self._chunks(indices):
                    _seed_chunk_noise(self.seed, repeat, index, device)
                    outputs = _call(copied, self.source.fmt, batch, envs.get(index), runner)
                    if position == 0:
                        self._checked(outputs, batch)
                    seen += self.source.fmt.samples(batch)
                    yield RepeatChunk([repeat], index, batch, [outputs])
                self._no_sample(seen)

    @torch.no_grad()
    def _folded(self) -> Iterator[RepeatChunk]:
        fmt = self.source.fmt
        progress_bar = bar(sum(len(group) for group, _ in self.work), "repeats (vectorized)")
        try:
            for position, (group, indices) in enumerate(self.work):
                if tuple(group) in self._shared_layers:  # programmed in parts with other ranks
                    layers = self._shared_layers.pop(tuple(group))
                elif self._reuses_probe(group):  # the same realizations
                    layers = self._probe_layers
                else:
                    layers = repeated_layers(self.module, self.lowered, self._seeds(group), self.t_inference)
                self._probe_layers = None
                restarts = [layer.at_chunk for layer in layers.values() if hasattr(layer, "at_chunk")]
                runner = FoldedRunner(self.module, layers, len(group))
                seen = 0
                for index, batch in self._chunks(indices):
                    for restart in restarts:
                        restart(index)
                    env = self.envs.get(index)
                    outputs = runner.run(*placeholder_values(self.module, *fmt.inputs(batch)),
                                         initial_env=dict(env) if env else None)
                    samples = fmt.samples(batch)
                    per_repeat = split_repeats(outputs, len(group), samples)
                    if per_repeat is None:
                        self._checked(outputs, batch)  # names what the outputs are
                        raise DataError(f"evaluation: the model's outputs do not carry the batch ({samples} samples) "
                                        "in their leading dimension, so hardware repeats cannot be told apart")
                    if position == 0:
                        self._checked(per_repeat[0], batch)
                    seen += samples
                    yield RepeatChunk(group, index, batch, per_repeat)
                self._no_sample(seen)
                progress_bar.update(len(group))
        finally:
            progress_bar.close()

    def _fold_probe(self, check_folding: bool) -> bool:
        """On the data's first chunk (the same on every rank, so every rank takes the same path): whether two
        folded repeats give what two separate runs give (noise off; when ``check_folding``), then, with more than
        two repeats, the working set of the two folded with noise on, per repeat (``per_repeat_bytes``, which sizes
        the groups), scaled by the largest staged chunk's bytes over the first's (a streamed loader's batches are
        taken as about the first's size).

        Both are properties of the graph, its modules and their dtypes on inputs of the first chunk's shapes, not of
        weights or values, so they are kept per module (``_FoldProbe``, ``_probe_key``) and reused by later runs of
        the same module on inputs of those shapes (LAFT's validations, evaluations at several t_inference), until
        the graph's code changes, a module is replaced or a dtype changes. A reused probe draws nothing: its first
        group draws its own. Running out of memory in the probe sends this run one repeat at a time, and keeps
        nothing."""
        batch = next(iter(self.source.chunks()))
        flat = placeholder_values(self.module, *self.source.fmt.inputs(batch))
        measure = len(self.repeats) > 2  # two repeats fold as one group whatever the budget
        key, modules = _probe_key(self.module, self.lowered, flat)
        kept = _FOLD_PROBES.setdefault(self.module, {})
        known = kept.get(key)
        if known is None or not known.serves(modules, check_folding, measure):
            try:
                known = self._probed(flat, check_folding, measure, modules)
            except torch.OutOfMemoryError:  # not a property of the graph: this run goes one repeat at a time
                self._probe_layers = None
                return False
            for stale in [other for other, probe in kept.items() if not probe.alive()]:  # replaced layers' probes
                del kept[stale]
            kept[key] = known
        if known.folds and measure:
            largest = 1.0
            if self.source.staged is not None:  # staged batches of other sizes: scale to the largest
                weights = self.source.chunk_weights()
                largest = max(weights) / weights[0]
            self.per_repeat_bytes = known.per_repeat_bytes * largest
        return known.folds

    def _probed(self, flat: list[Any], check_folding: bool, measure: bool, modules: list[torch.nn.Module]
                ) -> _FoldProbe:
        """The fold probe run: its realizations of the first two repeats are kept for the first group."""
        if self._prefix and 0 not in self.envs:  # the first chunk's prefix (kept if this rank's work holds it)
            self.envs = _prefix_cache(self.module, self.frontier, self.source, self._prefix_cache_bytes, range(1),
                                      self.envs)
        env = self.envs.get(0)
        outcome = _FoldProbe(False, check_folding, None, [weakref.ref(module) for module in modules])
        layers = repeated_layers(self.module, self.lowered, self._seeds(self.repeats[:2]), self.t_inference)
        if not flat or (check_folding and not folds(self.module, layers, flat, env)):
            return outcome
        self._probe_layers = layers  # the first group's when it is these two repeats (at_chunk restarts the noise)
        outcome.folds = True
        if measure:
            FoldedRunner(self.module, layers, 2).run(*flat, initial_env=dict(env) if env else None)
            outcome.per_repeat_bytes = _working_set(layers) / 2
        return outcome


@dataclass
class _FoldProbe:
    """A fold probe's outcome for one module on inputs of one set of shapes: whether repeats fold (``checked``: by
    the comparison, else taken so) and the working set per folded repeat on the first chunk (None: not measured);
    ``modules``: the graph's modules it ran (weak references: a replaced module makes a new probe)."""

    folds: bool
    checked: bool
    per_repeat_bytes: float | None
    modules: list[weakref.ref]

    def serves(self, modules: list[torch.nn.Module], check_folding: bool, measure: bool) -> bool:
        """Whether this outcome is what a probe of ``modules`` that checks folding or not, and needs the measure or
        not, would find: a check failed is no answer for a probe that would not check (it takes folding on trust)."""
        if len(modules) != len(self.modules) or any(ref() is not module for ref, module in zip(self.modules, modules)):
            return False
        if self.checked and not self.folds:  # a check that failed: only a probe that checks finds that
            return check_folding
        if check_folding and not self.checked:  # folding taken on trust answers no check
            return False
        return not (self.folds and measure and self.per_repeat_bytes is None)

    def alive(self) -> bool:
        """Whether every module it ran is still alive (else no later probe can match it)."""
        return all(ref() is not None for ref in self.modules)


# Fold probes by module (entries go with the module), then by ``_probe_key``.
_FOLD_PROBES: weakref.WeakKeyDictionary[fx.GraphModule, dict[tuple, _FoldProbe]] = weakref.WeakKeyDictionary()


def _probe_key(module: fx.GraphModule, lowered: dict[str, Any], flat: list[Any]
               ) -> tuple[tuple, list[torch.nn.Module]]:
    """What a fold probe's outcome depends on: the graph's code, its modules (every one: a digital layer may read
    the batch size too) and their parameters' and buffers' dtypes and devices (the working set is counted in
    bytes), the lowered layers' simulators, and the inputs' structure, shapes, dtypes and devices; and the modules
    themselves."""
    modules = list(module.modules())
    leaves, structure = pytree.tree_flatten(flat)
    inputs = tuple((tuple(value.shape), value.dtype, value.device) if isinstance(value, torch.Tensor)
                   else (type(value).__name__, value if isinstance(value, int | float | bool | str | None) else None)
                   for value in leaves)
    tensors = {(value.dtype, value.device) for value in itertools.chain(module.parameters(), module.buffers())}
    layers = tuple((name, getattr(lowered[name], "name", type(lowered[name]).__name__)) for name in sorted(lowered))
    return (module.code, layers, tuple(id(part) for part in modules), tuple(sorted(tensors, key=str)), str(structure),
            inputs), modules


def _sharers(owners: list[int]) -> list[int]:
    """The ranks (ascending) that run some chunk of a group, from its chunks' owners (``RepeatRunner._owners``)."""
    return sorted(set(owners))


def _working_set(layers: dict[str, Any]) -> float:
    """The largest working set (bytes) of repeat-vectorized ``layers``' calls so far (at least 1)."""
    return max(max((getattr(layer, "peak_bytes", 0) for layer in layers.values()), default=0), 1)


def repeat_outputs(module: fx.GraphModule, report: dict[str, dict[str, Any]], inputs: torch.Tensor, repeats: int,
                   t_inference: float = 86400.0, seed: int = 0, batch_size: int | None = None,
                   exact_tiles: bool = False, fold_bytes: int | None = None) -> torch.Tensor:
    """[repeats, N, ...] on the CPU: the lowered ``module``'s outputs on ``inputs`` [N, ...] in each hardware repeat,
    for analyses that need every sample's outputs (which samples fail). The repeats are ``evaluate``'s (same
    seeds, same paths: vectorized where the graph folds, else one repeat at a time); ``module`` is not changed.
    ``RepeatRunner.on_inputs`` with the same arguments also says which path ran (``method``)."""
    return RepeatRunner.on_inputs(module, report, inputs, repeats, t_inference, seed, batch_size, exact_tiles,
                                  fold_bytes).stacked()


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


def _prefix_cache(module: fx.GraphModule, frontier: fx.Node, source: EvaluationData, limit: int,
                  indices: Sequence[int] | None = None, known: dict[int, dict[fx.Node, Any]] | None = None
                  ) -> dict[int, dict[fx.Node, Any]]:
    """The digital prefix's values for the leading staged chunks of ``indices`` (None: all), by chunk index, as
    many as fit ``limit`` bytes: a chunk is computed only if the cache, grown by the first chunk's bytes per sample
    times its size, stays within it; ``known`` chunks' values are taken as they are."""
    known = known or {}
    if source.streamed or limit <= 0:
        return {}
    envs: dict[int, dict[fx.Node, Any]] = {}
    used, per_sample = 0, None
    for index, batch in source.indexed_chunks(indices):
        samples = source.fmt.samples(batch)
        if per_sample is not None and used + per_sample * samples > limit:
            break
        env = known.get(index) or _prefix_env(module, frontier, placeholder_values(module, *source.fmt.inputs(batch)))
        size = _nbytes(env)
        per_sample = per_sample or size / max(samples, 1)
        if used + size > limit:
            break
        envs[index] = env
        used += size
    return envs


def _repeat_seed(seed: int, repeat: int) -> int:
    """The seed of hardware repeat ``repeat`` of an evaluation seeded ``seed``: programming and drift draw from it
    (and the forward's noise from ``chunk_seed`` of it per data chunk), so repeat r depends on (seed, r) alone."""
    return (seed * 1_000_003 + repeat) % (2**63)


def _seed_chunk_noise(seed: int, repeat: int, chunk: int, device: torch.device) -> None:
    """Seed torch's RNG (for the model's ``device``) for chunk ``chunk`` of repeat ``repeat``: the forward noise of
    the tile path (and of ``plain_loop_accuracy``), drawn from torch's RNG, restarts per chunk as the vectorized
    layers' does."""
    seed_draws(chunk_seed(_repeat_seed(seed, repeat), chunk), device)


@contextlib.contextmanager
def hardware_repeat(module: torch.nn.Module, report: dict[str, dict[str, Any]], t_inference: float, seed: int,
                    repeat: int) -> Iterator[None]:
    """Repeat ``repeat``: fresh programming and drift seeded by (seed, repeat); the caller's RNG is untouched (the
    block may reseed it, as the tile path does per data chunk)."""
    device = next(module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_draws(_repeat_seed(seed, repeat), device)
        program_and_drift(module, report, t_inference)
        yield


def plain_loop_accuracy(module: torch.nn.Module, report: dict[str, dict[str, Any]], loader: Any, repeats: int,
                        t_inference: float, seed: int = 0) -> list[float]:
    """The reference loop: each repeat programs, drifts and iterates the loader, batch i's forward noise seeded as
    ``evaluate`` seeds chunk i (so it gives ``evaluate``'s tile path's values when its chunks are the batches)."""
    device = next(module.parameters()).device
    set_training(module, False)
    accuracies = []
    with torch.no_grad():
        for repeat in range(repeats):
            with hardware_repeat(module, report, t_inference, seed, repeat):
                correct = total = 0
                for index, (x, y) in enumerate(loader):
                    _seed_chunk_noise(seed, repeat, index, device)
                    correct += int((module(x.to(device)).argmax(-1) == y.to(device)).sum())
                    total += len(y)
            accuracies.append(correct / total)
    return accuracies
