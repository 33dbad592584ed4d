"""Accuracy of a lowered model over independent hardware repeats (re-program, then drift, each repeat).

Each repeat draws fresh programming noise and drift exponents (``program_and_drift``), seeded by
(seed, repeat) so that an evaluation is reproducible and repeat r does not depend on repeat r-1.
Repeats dominate wall time, so the evaluator:

- stages the whole test set on the model's device once (no DataLoader work per repeat);
- runs everything before the first analog layer once and reuses those activations in every repeat
  (the digital prefix is deterministic), when they fit in ``prefix_cache_bytes``;
- runs without autograd, in batches sized for the device.

``plain_loop_accuracy`` is the straightforward loop (program, drift, iterate the loader) kept as the
reference for tests and ``bench/evaluate.py``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx

from hetcomp import checks
from hetcomp.errors import DataError
from hetcomp.lower import lowered_modules, program_and_drift
from hetcomp.progress import progress


@dataclass
class Evaluation:
    """Accuracies of independent repeats at ``t_inference`` seconds after programming."""

    accuracies: list[float]
    t_inference: float
    mac_ratio: float  # fraction of mappable-layer MACs on analog targets
    seconds: float

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
    if isinstance(loader, tuple | list) and len(loader) == 2 and all(isinstance(t, torch.Tensor) for t in loader):
        inputs, labels = loader[0], loader[1]
    else:
        batches = []
        try:
            for batch in loader:
                batches.append((batch[0], batch[1]))
        except (TypeError, IndexError, KeyError):
            raise DataError(f"{what} must be an iterable of (inputs, labels) batches or an (inputs, labels) tensor "
                            f"pair, got {type(loader).__name__}") from None
        if not batches:
            raise DataError(f"{what} yielded no batch; pass a non-empty DataLoader")
        if not all(isinstance(t, torch.Tensor) for pair in batches for t in pair):
            raise DataError(f"{what}: each batch must be an (inputs, labels) pair of tensors")
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
            if node in needed:
                env[node] = value
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


def evaluate(module: fx.GraphModule, report: dict[str, dict[str, Any]], data: Any, repeats: int = 20,
             t_inference: float = 86400.0, seed: int = 0, mac_ratio: float = math.nan, batch_size: int | None = None,
             prefix_cache_bytes: int = 1 << 30) -> Evaluation:
    """Top-1 accuracy of the lowered ``module`` on ``data`` over ``repeats`` independent repeats.

    ``batch_size`` None: 128 on CPU (measured fastest for aihwkit's elementwise-heavy tiles), 4096 on CUDA.
    The data is checked (finite inputs, integer labels, in range of the model's outputs: DataError).
    """
    repeats = checks.integer("repeats", repeats)
    t_inference = checks.real("t_inference (seconds after programming)", t_inference, 0.0)
    seed = checks.seed(seed)
    batch_size = checks.integer("batch_size (None: 128 on CPU, 4096 on CUDA)", batch_size, optional=True)
    prefix_cache_bytes = checks.integer("prefix_cache_bytes", prefix_cache_bytes, 0)
    start = time.perf_counter()
    device = next(module.parameters()).device
    inputs, labels = staged(data, device)
    batch_size = batch_size if batch_size is not None else (4096 if device.type == "cuda" else 128)
    stochastic = set(lowered_modules(report))
    was_training = module.training
    module.eval()
    chunks = [(inputs[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]
    accuracies = []
    with torch.no_grad():  # not inference_mode: aihwkit keeps tensors made here (programmed weights)
        frontier = _frontier(module, stochastic)
        if frontier is None:  # nothing stochastic: one pass gives every repeat's result
            correct = 0
            for index, (x, y) in enumerate(chunks):
                logits = module(x)
                if index == 0:
                    accuracy_labels(logits, labels)
                correct += int((logits.argmax(-1) == y).sum())
            accuracies = [correct / len(labels)] * repeats
        else:
            prefix_computes = any(n.op not in ("placeholder", "get_attr") for n in _before(module, frontier))
            envs = [_prefix_env(module, frontier, x) if prefix_computes else {} for x, _ in chunks]
            if sum(_nbytes(env) for env in envs) > prefix_cache_bytes:
                envs = [{} for _ in chunks]
            runner = fx.Interpreter(module)
            for repeat in progress(range(repeats), desc="repeats", total=repeats):
                with hardware_repeat(module, report, t_inference, seed, repeat):
                    correct = 0
                    for index, ((x, y), env) in enumerate(zip(chunks, envs, strict=True)):
                        logits = runner.run(x, initial_env=dict(env)) if env else module(x)
                        if repeat == 0 and index == 0:
                            accuracy_labels(logits, labels)
                        correct += int((logits.argmax(-1) == y).sum())
                accuracies.append(correct / len(labels))
    module.train(was_training)
    return Evaluation(accuracies, float(t_inference), mac_ratio, time.perf_counter() - start)


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
