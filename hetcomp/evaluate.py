"""Accuracy of a lowered model over independent hardware repeats (re-program, then drift, each repeat).

Each repeat draws fresh programming noise and drift exponents (``program_and_drift``), seeded by
(seed, repeat) so that an evaluation is reproducible and repeat r does not depend on repeat r-1.
Repeats dominate wall time, so the evaluator:

- stages the test set on the model's device once (no DataLoader work per repeat) when it fits
  ``stage_bytes``, else streams it once per repeat (``EvaluationData``: memory stays bounded);
- runs everything before the first analog layer once and reuses those activations in every repeat
  (the digital prefix is deterministic), for as many chunks as fit ``prefix_cache_bytes`` (checked
  before each chunk is computed);
- runs without autograd, in batches sized for the device.

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
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from hetcomp import checks, distributed
from hetcomp.data import take_batches, tensor_pair
from hetcomp.errors import DataError
from hetcomp.lower import lowered_modules, program_and_drift
from hetcomp.lower.repeats import FoldedRunner, fold_matches, repeated_layers, why_not_vectorized
from hetcomp.progress import bar, progress


@dataclass
class Evaluation:
    """Accuracies of independent repeats at ``t_inference`` seconds after programming."""

    accuracies: list[float]
    t_inference: float
    mac_ratio: float  # fraction of mappable-layer MACs on analog targets
    seconds: float
    method: str = "tiles"  # "vectorized" (hetcomp.lower.repeats) or "tiles (why)": one repeat at a time

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
        return (f"accuracy {self.mean:.4f} ± {self.std:.4f} over {len(self.accuracies)} repeats at "
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


def _prefix_env(gm: fx.GraphModule, frontier: fx.Node, inputs: torch.Tensor) -> dict[fx.Node, Any]:
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
        Prefix(gm).run(inputs)
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
    """The evaluation set as device chunks of about ``batch_size`` samples, within a memory budget.

    When the data fits ``stage_bytes`` it is staged on the device once (for a tensor pair: views, no copy;
    for a loader: its batches re-chunked as they arrive, never the whole set twice). Otherwise it is
    streamed: every pass re-iterates the loader (or slices the tensors) and only one chunk is on the device
    at a time. Checked as it is read: finite inputs, integer labels (DataError).
    """

    def __init__(self, data: Any, device: torch.device, batch_size: int, stage_bytes: int,
                 what: str = "evaluation data") -> None:
        self.data, self.device, self.batch_size, self.what = data, device, batch_size, what
        self.tensors = tensor_pair(data)
        self.staged: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._checked = False  # a loader's batches are checked on the first complete pass, not on every repeat
        if self.tensors is not None:
            inputs, labels = self.tensors
            if len(inputs) != len(labels):
                raise DataError(f"{what}: {len(inputs)} inputs but {len(labels)} labels; pass one label per sample")
            if len(labels) == 0:
                raise DataError(f"{what} is empty; pass at least one sample")
            checks.pair(what, inputs, labels, labels=True)
            if _bytes(inputs, labels) <= stage_bytes:
                inputs, labels = inputs.to(device), labels.to(device)
                self.staged = [(inputs[i : i + batch_size], labels[i : i + batch_size])
                               for i in range(0, len(labels), batch_size)]
        else:
            self.staged = self._stage_loader(stage_bytes)

    @property
    def streamed(self) -> bool:
        return self.staged is None

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The (inputs, labels) chunks on the device, in order."""
        if self.staged is not None:
            yield from self.staged
        elif self.tensors is not None:
            inputs, labels = self.tensors
            for i in range(0, len(labels), self.batch_size):
                yield inputs[i : i + self.batch_size].to(self.device), labels[i : i + self.batch_size].to(self.device)
        else:
            for x, y in self._rechunked():
                yield x.to(self.device), y.to(self.device)

    def _stage_loader(self, stage_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        staged, total = [], 0
        for x, y in self._rechunked():
            total += _bytes(x, y)
            if total > stage_bytes:
                if iter(self.data) is self.data:  # a one-shot iterator cannot be read again
                    raise DataError(f"{self.what} is larger than stage_bytes={stage_bytes:,} and is a one-shot "
                                    "iterator, so it cannot be streamed once per repeat; pass a DataLoader (or "
                                    "raise stage_bytes)")
                return None  # stream it instead: the staged chunks are freed here
            staged.append((x.to(self.device), y.to(self.device)))
        if not staged:
            raise DataError(f"{self.what} yielded no batch; pass a non-empty DataLoader")
        return staged

    def _rechunked(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's batches, checked, regrouped into chunks of exactly ``batch_size`` samples (the last one
        may be smaller), so results do not depend on the loader's batch size."""
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        count = index = 0
        try:
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seeds here: not the repeat's stream
                iterator = iter(self.data)
        except TypeError:
            raise DataError(f"{self.what} must be an iterable of (inputs, labels) batches or an (inputs, labels) "
                            f"tensor pair, got {type(self.data).__name__}") from None
        for index, batch in enumerate(iterator):
            if not (isinstance(batch, tuple | list) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
                    and isinstance(batch[1], torch.Tensor)):
                raise DataError(f"{self.what}: each batch must be an (inputs, labels) pair of tensors, batch {index} "
                                f"is a {type(batch).__name__}")
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
             fold_bytes: int | None = None) -> Evaluation:
    """Top-1 accuracy of the lowered ``module`` on ``data`` over ``repeats`` independent repeats.

    ``batch_size`` None: 128 on CPU (measured fastest for aihwkit's elementwise-heavy tiles), 4096 on CUDA.
    Memory: the data is staged on the device when it fits ``stage_bytes``, else streamed once per repeat
    (``EvaluationData``); the digital prefix is cached chunk by chunk while the cache stays within
    ``prefix_cache_bytes`` (the limit is checked before each chunk is computed, from the first chunk's size
    per sample), the remaining chunks run whole every repeat. The data is checked (finite inputs, integer
    labels, in range of the model's outputs: DataError).

    Repeats run vectorized by default: every lowered layer whose simulator has a repeat-vectorized forward
    (aihwkit PCM) holds R realizations drawn from its noise model and the data passes once for all R
    (hetcomp.lower.repeats; ``fold_bytes`` bounds the working set, None: 1 GiB on CPU, 8 GiB on CUDA). It leaves
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
    start = time.perf_counter()
    device = next(module.parameters()).device
    batch_size = batch_size if batch_size is not None else (4096 if device.type == "cuda" else 128)
    source = EvaluationData(data, device, batch_size, stage_bytes)
    stochastic = set(lowered_modules(report))
    was_training = module.training
    module.eval()
    accuracies = []
    with torch.no_grad():  # not inference_mode: aihwkit keeps tensors made here (programmed weights)
        frontier = _frontier(module, stochastic)
        method = "exact (no analog layer)"
        if frontier is None:  # nothing stochastic: one pass gives every repeat's result
            correct, total = _correct(module, source.chunks(), [], None, check=True)
            accuracies = [correct / total] * repeats
        else:
            prefix_computes = any(n.op not in ("placeholder", "get_attr") for n in _before(module, frontier))
            envs = _prefix_cache(module, frontier, source, prefix_cache_bytes) if prefix_computes else []
            # Under torch.distributed each rank runs every world-th repeat (repeat r keeps its seed (seed, r))
            # and the results are gathered in order: the same accuracies as one process.
            rank, world = distributed.rank(), distributed.world_size()
            mine = list(range(rank, repeats, world))
            lowered = lowered_modules(report)
            local, method = None, "tiles (exact_tiles=True)"
            if not exact_tiles:
                why = why_not_vectorized(module, lowered)
                local = None if why else _folded_accuracies(module, lowered, source, envs, mine, seed, t_inference,
                                                            fold_bytes, check=rank == 0)
                method = "vectorized" if local is not None else f"tiles ({why or 'the graph does not fold repeats'})"
            if local is None:  # on a copy: programming and drift overwrite the tiles' weights
                local = _tile_accuracies(copy.deepcopy(module), report, source, envs, mine, seed, t_inference, rank)
            if world > 1:
                gathered: list[dict[int, float]] = [{} for _ in range(world)]
                dist.all_gather_object(gathered, local)
                local = {repeat: value for part in gathered for repeat, value in part.items()}
            accuracies = [local[repeat] for repeat in range(repeats)]
    module.train(was_training)
    return Evaluation(accuracies, float(t_inference), mac_ratio, time.perf_counter() - start, method)


def _tile_accuracies(module: fx.GraphModule, report: dict[str, dict[str, Any]], source: EvaluationData,
                     envs: list[dict[fx.Node, Any]], mine: list[int], seed: int, t_inference: float,
                     rank: int) -> dict[int, float]:
    """One repeat at a time through the simulators' own modules (program, drift, run): the reference path."""
    runner = fx.Interpreter(module)
    local = {}
    for repeat in progress(mine, desc="repeats", total=len(mine)):
        with hardware_repeat(module, report, t_inference, seed, repeat):
            correct, total = _correct(module, source.chunks(), envs, runner, check=repeat == rank)
        local[repeat] = correct / total
    return local


def _folded_accuracies(module: fx.GraphModule, lowered: dict[str, Any], source: EvaluationData,
                       envs: list[dict[fx.Node, Any]], mine: list[int], seed: int, t_inference: float,
                       fold_bytes: int | None, check: bool) -> dict[int, float] | None:
    """Accuracies of the repeats ``mine``, many per pass over the data (hetcomp.lower.repeats); None when the graph
    does not fold repeats (checked on the first chunk against separate runs).

    The first pass runs two repeats and measures the working set per repeat and sample; later passes take as many
    repeats as fit ``fold_bytes`` (None: 1 GiB on CPU, 8 GiB on CUDA)."""
    device = next(module.parameters()).device
    budget = fold_bytes if fold_bytes is not None else (8 << 30 if device.type == "cuda" else 1 << 30)
    local: dict[int, float] = {}
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
        if first and len(chunk) >= 2:  # a structural check: a few samples of the first chunk suffice
            x, _ = next(iter(source.chunks()))
            if not fold_matches(module, layers, x[:8], None):
                progress_bar.close()
                return None
        runner = FoldedRunner(module, layers, len(chunk))
        correct = torch.zeros(len(chunk), dtype=torch.long, device=device)
        total = 0
        for index, (x, y) in enumerate(source.chunks()):
            env = envs[index] if index < len(envs) else None
            logits = runner.run(x, initial_env=dict(env) if env else None)
            if not isinstance(logits, torch.Tensor) or logits.shape[0] != len(chunk) * len(y):
                accuracy_labels(logits, y)  # names what the outputs are
            logits = logits.view(len(chunk), len(y), -1)
            if first and check:
                accuracy_labels(logits[0], y)
            correct += (logits.argmax(-1) == y).sum(-1)
            total += len(y)
        if total == 0:
            raise DataError("evaluation data yielded no sample")
        if per_repeat_sample is None:
            working = max((getattr(layer, "peak_bytes", 0) for layer in layers.values()), default=0)
            per_repeat_sample = max(working / (len(chunk) * source.batch_size), 1.0)
        for repeat, value in zip(chunk, correct.tolist()):
            local[repeat] = value / total
        position += len(chunk)
        progress_bar.update(len(chunk))
        first = False
    progress_bar.close()
    return local


def _correct(module: fx.GraphModule, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]],
             envs: list[dict[fx.Node, Any]], runner: fx.Interpreter | None, check: bool) -> tuple[int, int]:
    """(correct predictions, samples) over ``chunks``; chunk i starts from the cached prefix ``envs[i]`` where
    there is one."""
    correct = total = 0
    for index, (x, y) in enumerate(chunks):
        env = envs[index] if index < len(envs) else None
        logits = runner.run(x, initial_env=dict(env)) if env else module(x)
        if check:  # every chunk's labels, on the first pass (a min/max per chunk)
            accuracy_labels(logits, y)
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    if total == 0:
        raise DataError("evaluation data yielded no sample")
    return correct, total


def _prefix_cache(module: fx.GraphModule, frontier: fx.Node, source: EvaluationData,
                  limit: int) -> list[dict[fx.Node, Any]]:
    """The digital prefix's values for the leading staged chunks, as many as fit ``limit`` bytes: a chunk is
    computed only if the cache, grown by the first chunk's bytes per sample times its size, stays within it."""
    if source.streamed or limit <= 0:
        return []
    envs: list[dict[fx.Node, Any]] = []
    used, per_sample = 0, None
    for x, _ in source.chunks():
        if per_sample is not None and used + per_sample * len(x) > limit:
            break
        env = _prefix_env(module, frontier, x)
        size = _nbytes(env)
        per_sample = per_sample or size / max(len(x), 1)
        if used + size > limit:
            break
        envs.append(env)
        used += size
    return envs


def accuracy_labels(logits: Any, labels: torch.Tensor, what: str = "evaluation data") -> None:
    """DataError unless the logits are [samples, classes] and ``labels`` class indices in [0, classes)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataError(f"{what}: top-1 accuracy needs model outputs of shape [samples, classes], got {shape}; "
                        "evaluate a classifier (or score other models with your own quality function)")
    checks.class_labels(what, labels, int(logits.shape[-1]), ignore_index=None)


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
    module.eval()
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
