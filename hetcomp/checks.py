"""Checks of user input, shared by every entry point: settings, seeds, data and weights.

Each check raises a ``HetcompError`` (``ConfigError`` for settings, ``DataError`` for data) whose message
names the setting or tensor, the value it got and what to pass instead. Entry points call them first,
before any expensive work (``hetcomp.compile`` validates every argument before it traces the model).

- ``integer``, ``real``, ``seed``, ``boolean``, ``choice``, ``callable_or_none``, ``path_or_none``:
  settings. ``integer`` refuses bools, floats and strings (``probes=2.5`` is an error, not 2); ``real``
  refuses NaN, infinities and strings.
- ``finite_tensors``, ``finite_parameters``: NaN/Inf in data or in a model's weights (``DataError`` naming
  the batch or parameter).
- ``class_labels``, ``checked_cross_entropy``: labels for the default loss: integer class indices in
  [0, classes) or the ignore index -100, not all ignored. ``checked_cross_entropy`` is the default
  ``loss_fn``, so every pass and fine-tuning step that uses the compile loss checks its labels.
- ``describe_inputs``: "shape [2, 3], float32" for error messages about example inputs.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetcomp.errors import ConfigError, DataError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
SEED_LIMIT = 2**63
_CHUNK = 1 << 24  # elements per finiteness check: bounds the temporary mask of a large tensor


def got(value: Any) -> str:
    """``2.5 (float)``: the value and its type, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _range(minimum: float | None, exclusive: bool, maximum: float | None, maximum_exclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if exclusive else '['}{minimum:g}, {maximum:g}{')' if maximum_exclusive else ']'}"
    if minimum is not None:
        return f" {'>' if exclusive else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if maximum_exclusive else '<='} {maximum:g}"
    return ""


def integer(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None, *,
            optional: bool = False) -> int | None:
    """``value`` as an int, or ConfigError: "probes must be an integer >= 1, got 2.5 (float)".

    bools, floats (even 3.0) and strings are refused; numpy integers are accepted. ``optional``: None is
    accepted (and returned)."""
    if value is None and optional:
        return None
    bounds = _range(minimum, False, maximum, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be {'None or ' if optional else ''}an integer{bounds}, got {got(value)}")
    return int(value)


def real(name: str, value: Any, minimum: float | None = None, exclusive: bool = False, maximum: float | None = None,
         maximum_exclusive: bool = False, *, optional: bool = False) -> float | None:
    """``value`` as a finite float within the bounds, or ConfigError: "gamma must be a finite number > 0,
    got nan (float)". bools, strings, NaN and infinities are refused. ``exclusive``: the minimum itself
    is refused; ``maximum_exclusive`` likewise."""
    if value is None and optional:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if maximum_exclusive else value <= maximum
    if not ok:
        raise ConfigError(f"{name} must be {'None or ' if optional else ''}a finite number"
                          f"{_range(minimum, exclusive, maximum, maximum_exclusive)}, got {got(value)}")
    return float(value)


def seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**63) (what torch, numpy and scikit-learn all accept after reduction)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, 2**63), got {got(value)}; e.g. {name}=0")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {got(value)}")
    return value


def choice(name: str, value: Any, options: Iterable[Any]) -> Any:
    options = tuple(options)
    if not isinstance(value, str | int | float) or isinstance(value, bool) or value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {got(value)}")
    return value


def callable_or_none(name: str, value: Any, expected: str = "a function") -> Any:
    """``value`` if it is None or callable, else ConfigError naming what is expected."""
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be None or {expected}, got {got(value)}")
    return value


def path_or_none(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{name} must be None or a folder path (str or pathlib.Path), got {got(value)}")
    return value


# -- data ------------------------------------------------------------------------------------------------

def _nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN/Inf entries ``tensor`` holds (0 for integer and bool tensors), in bounded chunks."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    flat = tensor.detach().reshape(-1)
    if flat.numel() <= _CHUNK:
        return int((~torch.isfinite(flat)).sum())
    return sum(int((~torch.isfinite(flat[i : i + _CHUNK])).sum()) for i in range(0, flat.numel(), _CHUNK))


DATA_FIX = "drop or repair those samples (e.g. torch.nan_to_num, or filter them out of the dataset) and retry"


def finite_tensors(what: str, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], fix: str = DATA_FIX) -> None:
    """DataError naming the first tensor (by its label) that holds NaN or Inf; non-tensors are skipped.

    "calibration data batch 0: inputs: 3 of 192 values are NaN or Inf; drop or repair those samples ..."
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for label, tensor in items:
        if isinstance(tensor, torch.Tensor):
            bad = _nonfinite(tensor)
            if bad:
                raise DataError(f"{what}: {label}: {bad} of {tensor.numel()} values are NaN or Inf; {fix}")


def finite_parameters(model: nn.Module) -> None:
    """DataError naming the first parameter or floating buffer of ``model`` that holds NaN or Inf."""
    fix = ("the model's weights are unusable: load finite weights (check the checkpoint you loaded, or retrain "
           "with a lower learning rate)")
    named = [(f"parameter {name!r}", p) for name, p in model.named_parameters()]
    named += [(f"buffer {name!r}", b) for name, b in model.named_buffers() if b.is_floating_point()]
    finite_tensors(f"model {type(model).__name__}", named, fix)


def _class_dim(logits: torch.Tensor) -> int:
    """The class dimension of ``logits`` as cross_entropy reads it: 1, or 0 for unbatched logits."""
    return 1 if logits.dim() >= 2 else 0


def label_dtype(what: str, labels: Any) -> None:
    """DataError unless ``labels`` is an integer tensor (class indices for cross-entropy / accuracy)."""
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{what}: labels must be a tensor of class indices, got {type(labels).__name__}; "
                        "make each batch an (inputs, labels) pair of tensors")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{what}: labels have dtype {str(labels.dtype).replace('torch.', '')}; the default loss "
                        "(cross-entropy) and accuracy need integer class indices: pass labels.long() (for other "
                        "targets, e.g. class probabilities or regression values, pass your own loss_fn=)")


def class_labels(what: str, labels: torch.Tensor, classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
    """DataError unless every label is an integer in [0, classes) or ``ignore_index``, and not all are
    ignored. One device synchronisation."""
    label_dtype(what, labels)
    if labels.numel() == 0:
        raise DataError(f"{what}: an empty batch (no labels); drop empty batches from the data")
    valid = (labels >= 0) & (labels < classes)
    ignored = labels == ignore_index if ignore_index is not None else torch.zeros_like(valid)
    bad, used = (int(v) for v in torch.stack(((~(valid | ignored)).sum(), valid.sum())).tolist())
    if bad:
        example = int(labels[~(valid | ignored)].reshape(-1)[0])
        allowed = f" or the ignore index {ignore_index}" if ignore_index is not None else ""
        raise DataError(f"{what}: {bad} of {labels.numel()} labels are outside [0, {classes}){allowed} "
                        f"(e.g. {example}) but the model has {classes} outputs; labels out of range: pass class "
                        f"indices 0..{classes - 1} (or a model with one output per class)")
    if not used:
        raise DataError(f"{what}: every label is the ignore index {ignore_index}, so there is nothing to compute "
                        "the loss on (the Hessian would be zero and every layer digital); pass labelled data")


def checked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, labels)`` after checking the labels: integer class indices in
    [0, classes) or -100 (ignored), not all ignored, shaped like the logits without the class dimension.
    Any integer dtype is accepted (int32 labels are cast to int64, which cross_entropy needs).
    The default ``loss_fn`` of hetcomp.compile. (Class probabilities as targets need an explicit
    ``loss_fn=torch.nn.functional.cross_entropy``.)"""
    what = "data"
    label_dtype(what, labels)
    dim = _class_dim(logits)
    expected = tuple(logits.shape[:dim]) + tuple(logits.shape[dim + 1 :])
    if tuple(labels.shape) != expected:
        raise DataError(f"{what}: labels of shape {list(labels.shape)} do not fit model outputs of shape "
                        f"{list(logits.shape)} (expected labels of shape {list(expected)}: one class index per "
                        "sample); reshape the labels (e.g. labels.view(-1)) or pass your own loss_fn=")
    class_labels(what, labels, int(logits.shape[dim]))
    if labels.dtype not in (torch.long, torch.uint8):  # int32 etc.: valid class indices cross_entropy refuses
        labels = labels.long()
    return F.cross_entropy(logits, labels)


def pair(what: str, inputs: Any, targets: Any, labels: bool) -> None:
    """``inputs`` finite; with ``labels`` (the default loss) integer ``targets``, else finite ``targets``."""
    finite_tensors(what, [("inputs", inputs)])
    if labels:
        label_dtype(what, targets)
    else:
        finite_tensors(what, [("labels", targets)])


def batches(what: str, pairs: Iterable[tuple[Any, Any]], labels: bool, start: int = 0) -> None:
    """``pair`` for every (inputs, targets) batch; errors name the batch (counting from ``start``)."""
    for index, (inputs, targets) in enumerate(pairs, start):
        pair(f"{what} batch {index}", inputs, targets, labels)


def describe_inputs(inputs: Any) -> str:
    """"shape [2, 3], float32" per tensor input (other inputs by type), for messages about example inputs."""
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs) if \
        isinstance(inputs, tuple | list) else [inputs]
    parts = [f"shape {list(v.shape)}, {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor)
             else type(v).__name__ for v in values]
    return "; ".join(parts) if parts else "none"
