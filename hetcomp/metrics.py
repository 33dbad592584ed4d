"""Task metrics for evaluation (over hardware repeats), LAFT's validation, mac-greedy's acceptance test and row
remap: what "quality" means for a model, beyond top-1 accuracy.

A ``Metric`` is map-reduce over the data, so one protocol serves both kinds the evaluator needs and it never has
to hold a whole dataset's outputs: ``update(outputs, target, samples)`` turns one batch's outputs into a small part
(a correct count, or the batch's pooled embeddings) and ``finish(parts)`` reduces a repeat's parts to its value.
``target`` is what the data format gives the loss (a labelled batch's labels, else the whole batch; see
hetcomp.data).

- ``BatchMean(fn)``: ``fn(outputs, target)`` per batch, reduced to the sample-weighted mean over the data. ``fn``
  returns one value per sample (a 1-D tensor: averaged over all samples) or the batch's mean (a scalar: weighted
  by the batch's sample count). A plain function passed as ``metric=`` becomes one.
- ``DatasetMetric(collect, compute)``: a whole-dataset metric such as Recall@1 among all test documents:
  ``collect(outputs, target)`` per batch (keep it small: e.g. normalized embeddings), ``compute(list of
  collected)`` once per repeat. ``compute`` may return a dict of values: the one named like the metric is the
  result, the others are recorded beside it (``Evaluation.others``), e.g. MRR next to Recall@1.
- ``ACCURACY`` (the default): top-1 accuracy of [samples, classes] logits against integer labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from hetcomp import checks
from hetcomp.errors import ConfigError, DataError


class Metric:
    """Subclass and implement ``update`` and ``finish`` (see the module docstring); ``check`` may raise a
    DataError naming what is wrong with the outputs or the target (run on the first batch of a pass only)."""

    name: str = "metric"
    higher_is_better: bool = True

    def check(self, outputs: Any, target: Any) -> None:
        """Raise DataError when ``outputs``/``target`` cannot be scored (called on the first pass's batches)."""

    def update(self, outputs: Any, target: Any, samples: int) -> Any:
        raise NotImplementedError

    def finish(self, parts: list[Any]) -> float | dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class BatchMean(Metric):
    """The sample-weighted mean of ``fn(outputs, target)`` over the data."""

    def __init__(self, fn: Callable[[Any, Any], Any], name: str | None = None, higher_is_better: bool = True) -> None:
        checks.callable_or_none("metric", fn, "a function (outputs, target) -> value")
        self.fn, self.name = fn, name or getattr(fn, "__name__", None) or type(fn).__name__
        self.higher_is_better = checks.boolean("higher_is_better", higher_is_better)

    def update(self, outputs: Any, target: Any, samples: int) -> tuple[Any, int]:
        value = self.fn(outputs, target)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.detach().double().sum(), value.numel()
        if isinstance(value, torch.Tensor):
            return value.detach().double() * samples, samples
        return float(value) * samples, samples

    def finish(self, parts: list[tuple[Any, int]]) -> float:
        count = sum(n for _, n in parts)
        if count == 0:
            raise DataError(f"metric {self.name!r}: the data yielded no sample to score")
        return float(sum(total for total, _ in parts)) / count


class DatasetMetric(Metric):
    """A whole-dataset metric: ``compute([collect(outputs, target) for each batch])``."""

    def __init__(self, collect: Callable[[Any, Any], Any], compute: Callable[[list[Any]], Any], name: str,
                 higher_is_better: bool = True) -> None:
        checks.callable_or_none("collect", collect, "a function (outputs, target) -> per-batch part")
        checks.callable_or_none("compute", compute, "a function (list of parts) -> value or {name: value}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a DatasetMetric needs a name (the value it reports), got {checks.got(name)}")
        self.collect, self.compute, self.name = collect, compute, name
        self.higher_is_better = checks.boolean("higher_is_better", higher_is_better)

    def update(self, outputs: Any, target: Any, samples: int) -> Any:
        return self.collect(outputs, target)

    def finish(self, parts: list[Any]) -> float | dict[str, float]:
        if not parts:
            raise DataError(f"metric {self.name!r}: the data yielded no batch to score")
        return self.compute(parts)


def accuracy_labels(logits: Any, labels: Any, what: str = "evaluation data") -> None:
    """DataError unless the logits are [samples, classes] and ``labels`` class indices in [0, classes)."""
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{what}: the default metric, top-1 accuracy, needs (inputs, labels) batches; these batches "
                        f"are {type(labels).__name__}s: pass metric=<(outputs, batch) -> value> (or a "
                        "hetcomp.metrics.Metric) for this task")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataError(f"{what}: top-1 accuracy needs model outputs of shape [samples, classes], got {shape}; "
                        "evaluate a classifier (or score other models with your own metric=)")
    checks.class_labels(what, labels, int(logits.shape[-1]), ignore_index=None)


class Accuracy(Metric):
    """Top-1 accuracy: the default metric. Counts stay on the device until ``finish`` (no sync per batch)."""

    name = "accuracy"

    def check(self, outputs: Any, target: Any) -> None:
        accuracy_labels(outputs, target)

    def update(self, outputs: Any, target: Any, samples: int) -> tuple[torch.Tensor, int]:
        if not isinstance(target, torch.Tensor) or not isinstance(outputs, torch.Tensor):
            accuracy_labels(outputs, target)  # names what is wrong
        return (outputs.argmax(-1) == target).sum(), int(target.numel())

    def finish(self, parts: list[tuple[torch.Tensor, int]]) -> float:
        total = sum(n for _, n in parts)
        if total == 0:
            raise DataError("evaluation data yielded no sample")
        return int(torch.stack([c for c, _ in parts]).sum()) / total


ACCURACY = Accuracy()


def as_metric(metric: Any) -> Metric:
    """``metric`` as a Metric: None is top-1 accuracy, a Metric itself, a function ``(outputs, target) -> value``
    a ``BatchMean``."""
    if metric is None:
        return ACCURACY
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return BatchMean(metric)
    raise ConfigError(f"metric must be None (top-1 accuracy), a function (outputs, target) -> value or a "
                      f"hetcomp.metrics.Metric, got {checks.got(metric)}")


def split_value(metric: Metric, value: float | Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """(the metric's value, the other named values it reported)."""
    if isinstance(value, Mapping):
        if metric.name not in value:
            raise ConfigError(f"metric {metric.name!r} returned values {sorted(value)}, none named {metric.name!r}; "
                              "name one of them like the metric (it is the result)")
        others = {str(k): float(v) for k, v in value.items() if k != metric.name}
        return float(value[metric.name]), others
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value), {}
