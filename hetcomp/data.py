"""What hetcomp accepts as data, read in one place: an ``(inputs, labels)`` pair of tensors, or an iterable
(a DataLoader) of such batches. Every pipeline stage that reads data (tracing, the Hessian passes, fine-tuning,
evaluation, row remap, the curvature study, the CLI) goes through these functions, so they agree on what a
batch is and never draw from the caller's random number generator.
"""

from __future__ import annotations

from typing import Any

import torch

from hetcomp.errors import DataError


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


def take_batches(data: Any, count: int | None, seed: int | None = None,
                 what: str = "data") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` (None: all) (inputs, labels) batches of ``data``; a tensor pair is one batch.

    Read with the caller's RNG untouched; with ``seed``, torch's RNG is seeded while the loader is iterated, so
    a shuffling loader that draws from it gives the same batches every time. DataError for a batch that is not
    an (inputs, labels) pair of tensors, or for no batch at all."""
    pair = tensor_pair(data)
    if pair is not None:
        return [pair]
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            iterator = iter(data)
        except TypeError:
            raise DataError(f"{what} must be an iterable of (inputs, labels) batches or an (inputs, labels) tensor "
                            f"pair, got {type(data).__name__}") from None
        for batch in iterator:
            if not (isinstance(batch, tuple | list) and len(batch) >= 2):
                raise DataError(f"{what} batch {len(batches)} is a {type(batch).__name__}, not an (inputs, targets) "
                                "pair; make the dataset return (input, label) samples")
            if not all(isinstance(t, torch.Tensor) for t in batch[:2]):
                raise DataError(f"{what} batch {len(batches)} holds {type(batch[0]).__name__} inputs and "
                                f"{type(batch[1]).__name__} targets; both must be tensors (use the default "
                                "collate_fn)")
            batches.append((batch[0], batch[1]))
            if count is not None and len(batches) == count:
                break
    if not batches:
        raise DataError(f"{what} yielded no batch; pass a non-empty DataLoader (check drop_last and the dataset "
                        "size)")
    return batches


def first_inputs(data: Any, what: str = "data") -> tuple[torch.Tensor]:
    """Example inputs for tracing: the inputs of ``data``'s first batch."""
    return (take_batches(data, 1, what=what)[0][0],)
