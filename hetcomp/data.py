"""What hetcomp accepts as data, read in one place. Every pipeline stage that reads data (tracing, the Hessian
passes, fine-tuning, evaluation, row remap, the curvature study, the CLI) goes through this module, so they agree
on what a batch is and never draw from the caller's random number generator.

Two kinds of batch, told apart per batch by ``DataFormat``:

- **labelled** (the default): an ``(inputs, labels)`` pair of tensors (a DataLoader over a TensorDataset, or
  one pair of tensors as the whole data). The model is called as ``model(inputs)``, the loss as
  ``loss_fn(outputs, labels)`` (default: cross-entropy with checked labels) and the default metric is top-1
  accuracy.
- **general**: any other structure, e.g. a Hugging Face style dict of tensors, or anything at all when the
  user gives ``inputs_fn``. The model inputs are ``inputs_fn(batch)`` (a tensor: one positional input; a tuple:
  positional inputs; a mapping: keyword inputs), or, for a mapping batch without ``inputs_fn``, the mapping
  itself as keyword inputs (``model(**batch)``). The loss is ``loss_fn(outputs, batch)`` and the metric
  ``metric(outputs, batch)``: both see the whole batch, so they can read labels, attention masks or anything
  else the batch carries (pooling outside the model, in-batch contrastive losses). A general batch is never
  re-chunked: it is one unit for the loss and the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hetcomp import checks
from hetcomp.errors import ConfigError, DataError

Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # (positional inputs, keyword inputs) of one model call

GENERAL_HINT = ("(for other batch structures, e.g. dicts of tensors, pass inputs_fn=<batch -> model inputs> and "
                "loss_fn=<(outputs, batch) -> loss>)")


def tensor_pair(data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``data`` as (inputs, labels) when it is one pair of tensors, else None."""
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    return None


def whole_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, labels) when they are at hand without iterating ``data``: a tensor pair, or a DataLoader over a
    TensorDataset of two tensors. None otherwise."""
    pair = tensor_pair(data)
    if pair is not None:
        return pair
    dataset = getattr(data, "dataset", None)
    tensors = getattr(dataset, "tensors", None) if isinstance(dataset, torch.utils.data.TensorDataset) else None
    return (tensors[0], tensors[1]) if tensors is not None and len(tensors) == 2 else None


def call_inputs(value: Any) -> Inputs:
    """Model inputs as (args, kwargs): a mapping is keyword inputs, a tuple or list positional inputs, anything
    else one positional input."""
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, tuple | list):
        return tuple(value), {}
    return (value,), {}


def tensor_leaves(value: Any, path: str = "batch") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested structure (mappings, tuples, lists, dataclass-like objects are not entered),
    with its path ("batch['input_ids']", "batch[1]"), in order."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from tensor_leaves(item, f"{path}[{key!r}]")
    elif isinstance(value, tuple | list):
        for index, item in enumerate(value):
            yield from tensor_leaves(item, f"{path}[{index}]")


def move(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device`` (mappings become dicts; other leaves kept)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: move(item, device) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(move(item, device) for item in value))
    if isinstance(value, tuple | list):
        return type(value)(move(item, device) for item in value)
    return value


def nbytes(value: Any) -> int:
    """Bytes of all tensors in a (nested) batch."""
    return sum(t.numel() * t.element_size() for _, t in tensor_leaves(value))


@dataclass(frozen=True)
class DataFormat:
    """How a batch is read: what the model gets, what the loss and the metric get, how many samples it holds.

    ``inputs_fn``: batch -> model inputs (a tensor, a tuple of positional inputs or a mapping of keyword
    inputs). None: an ``(inputs, labels)`` pair is labelled (``model(inputs)``), a mapping batch is keyword
    inputs (``model(**batch)``). See the module docstring.
    """

    inputs_fn: Callable[[Any], Any] | None = None

    def labelled(self, batch: Any) -> bool:
        """Whether ``batch`` is read as an (inputs, labels) pair: loss and metric get the labels, not the batch."""
        return self.inputs_fn is None and not isinstance(batch, Mapping)

    def inputs(self, batch: Any) -> Inputs:
        """The model inputs of ``batch`` as (args, kwargs)."""
        if self.inputs_fn is not None:
            try:
                value = self.inputs_fn(batch)
            except Exception as error:
                raise DataError(f"inputs_fn failed on a batch ({type(error).__name__}: {error}); it must map one "
                                "batch of data to the model's inputs") from error
            return call_inputs(value)
        if isinstance(batch, Mapping):
            return (), dict(batch)
        return (batch[0],), {}

    def target(self, batch: Any) -> Any:
        """What the loss and the metric get besides the outputs: the labels of a labelled batch, else the batch."""
        return batch[1] if self.labelled(batch) else batch

    def samples(self, batch: Any) -> int:
        """Samples in ``batch``: a labelled batch's label count, else the leading dimension of the first tensor
        among its model inputs (the batch dimension, as tracing reads it)."""
        if self.labelled(batch):
            labels = batch[1]
            return int(labels.shape[0]) if labels.dim() else 1
        args, kwargs = self.inputs(batch)
        for _, tensor in tensor_leaves((args, kwargs)):
            if tensor.dim() >= 1:
                return int(tensor.shape[0])
        raise DataError("a batch's model inputs hold no batched tensor (leading dimension = samples); inputs_fn "
                        "must return the model's tensor inputs")

    def check(self, what: str, batch: Any, labels: bool) -> None:
        """DataError for NaN/Inf in ``batch`` (any tensor in it); a labelled batch with ``labels`` (the default
        loss) also needs integer labels."""
        if self.labelled(batch):
            checks.pair(what, batch[0], batch[1], labels)
        else:
            checks.finite_tensors(what, list(tensor_leaves(batch)))

    def loss(self, loss_fn: Callable | None, outputs: Any, batch: Any) -> torch.Tensor:
        """The loss of ``outputs`` on ``batch``: ``loss_fn(outputs, labels)`` for a labelled batch (None:
        cross-entropy with checked labels), ``loss_fn(outputs, batch)`` otherwise (None: ConfigError)."""
        if self.labelled(batch):
            return (loss_fn or checks.checked_cross_entropy)(outputs, batch[1])
        if loss_fn is None:
            raise needs_loss(batch)
        return loss_fn(outputs, batch)


def needs_loss(batch: Any) -> ConfigError:
    return ConfigError(f"batches that are not (inputs, labels) pairs (here a {type(batch).__name__}) need "
                       "loss_fn=<(outputs, batch) -> scalar loss>: hetcomp cannot guess the task's loss")


def _pair_batch(batch: Any, index: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled batch's (inputs, labels), or the DataError saying what is wrong with it."""
    if not (isinstance(batch, tuple | list) and len(batch) >= 2):
        raise DataError(f"{what} batch {index} is a {type(batch).__name__}, not an (inputs, targets) pair; make the "
                        f"dataset return (input, label) samples {GENERAL_HINT}")
    if not all(isinstance(t, torch.Tensor) for t in batch[:2]):
        raise DataError(f"{what} batch {index} holds {type(batch[0]).__name__} inputs and {type(batch[1]).__name__} "
                        f"targets; both must be tensors (use the default collate_fn) {GENERAL_HINT}")
    return batch[0], batch[1]


def take_batches(data: Any, count: int | None, seed: int | None = None, what: str = "data",
                 fmt: DataFormat | None = None) -> list[Any]:
    """The first ``count`` (None: all) batches of ``data``; a tensor pair is one batch. Labelled batches come back
    as (inputs, labels) tuples, general ones (``fmt``) as they are.

    Read with the caller's RNG untouched; with ``seed``, torch's RNG is seeded while the loader is iterated, so
    a shuffling loader that draws from it gives the same batches every time. DataError for a labelled batch that
    is not an (inputs, labels) pair of tensors, or for no batch at all."""
    fmt = fmt or DataFormat()
    pair = tensor_pair(data)
    if pair is not None:
        return [pair]
    batches: list[Any] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            iterator = iter(data)
        except TypeError:
            raise DataError(f"{what} must be an iterable of (inputs, labels) batches or an (inputs, labels) tensor "
                            f"pair, got {type(data).__name__} {GENERAL_HINT}") from None
        for batch in iterator:
            if fmt.labelled(batch):
                batch = _pair_batch(batch, len(batches), what)
            elif isinstance(batch, Mapping) and not isinstance(batch, dict):  # e.g. a tokenizer's BatchEncoding
                batch = dict(batch)
            batches.append(batch)
            if count is not None and len(batches) == count:
                break
    if not batches:
        raise DataError(f"{what} yielded no batch; pass a non-empty DataLoader (check drop_last and the dataset "
                        "size)")
    return batches


def first_inputs(data: Any, what: str = "data", fmt: DataFormat | None = None) -> tuple | dict[str, Any]:
    """Example inputs for tracing, from ``data``'s first batch: a tuple of positional inputs, or a dict of
    keyword inputs."""
    fmt = fmt or DataFormat()
    args, kwargs = fmt.inputs(take_batches(data, 1, what=what, fmt=fmt)[0])
    if args and kwargs:
        raise ConfigError("the model inputs of a batch mix positional and keyword inputs; inputs_fn must return a "
                          "tuple of positional inputs or a dict of keyword inputs, not both")
    return kwargs if kwargs else args
