"""Training data for fine-tuning: a seeded train/validation split of the compile ``data``.

Validation is a split of the *training* data (or ``val_data`` the user hands in); the test split is
never touched by fine-tuning or by a partition search. Epoch shuffles use their own seeded generator,
so a stage's batches depend only on (seed, stage, epoch), which is what makes resuming exact.

Under torch.distributed (``shards``) each rank trains on a contiguous slice of every one of those global
batches: the global batch stays ``batch_size`` and holds exactly the samples one process would use, so a
data-parallel stage computes what one process computes (up to float reduction order). torch's
``DistributedSampler`` is not used: it shuffles with its own generator (another order than one process) and
pads the epoch with repeated samples when the training set does not divide by the world size.

The data is checked (hetcomp.checks): inputs finite, labels integer class indices with the default loss.
Tensor data (a tensor pair, or a DataLoader over a TensorDataset) is checked whole when split; other
datasets batch by batch as training reads them (``TrainingData.batches``); validation data when staged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from hetcomp import checks
from hetcomp.data import tensor_pair, whole_tensors
from hetcomp.errors import ConfigError
from hetcomp.evaluate import staged


@dataclass
class TrainingData:
    train: Dataset
    val: tuple[torch.Tensor, torch.Tensor]  # staged validation inputs and labels (CPU)
    batch_size: int
    checked: bool = True  # the training tensors were checked whole; else ``batches`` checks each batch
    class_labels: bool = True  # the default loss: labels must be integer class indices

    def epoch_loader(self, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator)

    def epoch_indices(self, seed: int) -> list[list[int]]:
        """The epoch's global batches as indices into ``train``: exactly those ``epoch_loader(seed)`` deals (the
        same seeded, shuffled DataLoader, over the indices, so it makes the same generator draws)."""
        order = DataLoader(range(len(self.train)), batch_size=self.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(seed))
        return [batch.tolist() for batch in order]

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's (inputs, labels) batches, each checked (DataError) unless the data was checked whole."""
        for shard in self.shards(seed):
            yield shard.inputs, shard.labels

    def shards(self, seed: int, rank: int = 0, world: int = 1) -> Iterator[Shard]:
        """This rank's part of each of the epoch's global batches (all of it in one process), checked as
        ``batches`` checks. Global batch b of n samples is cut into ``world`` contiguous slices (sizes differ by
        at most one); rank r gets slice r with ``weight = world * len(slice) / n``, the factor that makes the
        mean of the ranks' weighted mean losses (DistributedDataParallel averages gradients) the mean over the
        global batch. A batch of fewer samples than ranks (only a short last batch, as ``batch_size >= world``)
        goes whole to every rank (``whole``: train it without gradient averaging; every rank computes the
        same step)."""
        if world == 1:
            for index, batch in enumerate(self.epoch_loader(seed)):  # one process: the loader itself
                self._check(batch, index)
                yield Shard(batch[0], batch[1], 1.0, True)
            return
        global_batches = self.epoch_indices(seed)
        parts = [_slice(batch, rank, world) for batch in global_batches]
        # Fetches and collates this rank's samples only. Its own generator: a DataLoader without one draws its
        # worker seed from torch's global RNG, which is the training-noise stream every rank keeps in step.
        loader = DataLoader(self.train, batch_sampler=parts, generator=torch.Generator())
        for index, (batch, part) in enumerate(zip(loader, parts, strict=True)):
            self._check(batch, index)
            total = len(global_batches[index])
            whole = total < world
            yield Shard(batch[0], batch[1], 1.0 if whole else world * len(part) / total, whole)

    def _check(self, batch: Any, index: int) -> None:
        if not self.checked:
            checks.batches("training data", [batch[:2]], self.class_labels, start=index)


class Shard(NamedTuple):
    """One rank's part of a global training batch (``TrainingData.shards``)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    weight: float  # multiplies this rank's mean loss: world * samples here / samples in the global batch
    whole: bool  # every rank holds the whole global batch (one process, or a batch smaller than the world)


def _slice(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of ``batch`` (the first ``len % world`` slices one longer), or the whole
    batch when it has fewer samples than ranks."""
    if len(batch) < world:
        return batch
    size, extra = divmod(len(batch), world)
    start = rank * size + min(rank, extra)
    return batch[start : start + size + (rank < extra)]


def training_split(data: Any, val_data: Any = None, val_fraction: float = 0.1, seed: int = 0,
                   batch_size: int | None = None, class_labels: bool = True) -> TrainingData:
    """Split ``data`` (a DataLoader over a map-style dataset, or an (inputs, labels) tensor pair).
    ``class_labels``: the loss is the default cross-entropy, so labels must be integer class indices."""
    batch_size = checks.integer("batch_size", batch_size, optional=True)
    if isinstance(data, DataLoader):
        dataset = data.dataset
        batch_size = batch_size or data.batch_size or 64
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError("fine-tuning needs a DataLoader over a map-style dataset (with __len__ and "
                              "__getitem__) so that it can split off validation data and reshuffle per epoch")
    elif tensor_pair(data) is not None:
        dataset = TensorDataset(*tensor_pair(data))
        batch_size = batch_size or 64
    else:
        raise ConfigError("fine-tuning needs data= as a DataLoader or an (inputs, labels) tensor pair, "
                          f"got {type(data).__name__}")
    whole = whole_tensors(data)
    if whole is not None:
        checks.pair("training data", *whole, class_labels)
    if val_data is not None:
        return TrainingData(dataset, staged(val_data, torch.device("cpu"), "validation data (val_data)"), batch_size,
                            whole is not None, class_labels)
    checks.real("val_fraction", val_fraction, 0.0, True, 1.0, True)
    n_val = max(1, int(round(len(dataset) * val_fraction)))
    if n_val >= len(dataset):
        raise ConfigError(f"{len(dataset)} training samples are too few to split off {val_fraction:.0%} validation")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    val = Subset(dataset, order[:n_val])
    train = Subset(dataset, order[n_val:])
    val_tensors = staged(DataLoader(val, batch_size=max(batch_size, 256)), torch.device("cpu"),
                         f"validation data ({val_fraction:.0%} split of data)")
    return TrainingData(train, val_tensors, batch_size, whole is not None, class_labels)
