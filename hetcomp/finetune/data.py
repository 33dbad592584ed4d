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

Batches of any structure (hetcomp.data: a dict of tensors, or anything ``inputs_fn`` reads) train the same way:
the epoch loaders use the user DataLoader's ``collate_fn``, and validation is a list of the user's batches of the
validation split (whole batches, for a metric such as Recall@1 over the whole split). Under torch.distributed a
rank's slice of a global batch is collated on its own: a loss that compares the batch's samples with each other
(an in-batch contrastive loss, whose negatives are the batch's other samples) gets the global batch's rows from
``hetcomp.distributed.gather_batch`` (as ``hetcomp.zoo.docstrings.info_nce`` does); else it sees only its slice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from hetcomp import checks
from hetcomp.data import DataFormat, nbytes, needs_loss, take_batches, tensor_pair, whole_tensors
from hetcomp.errors import ConfigError
from hetcomp.evaluate import staged

STAGE_BYTES = 1 << 30  # training tensors up to this size are kept on the training device


@dataclass
class TrainingData:
    """The training set, the validation data, and how both are read and scored.

    ``val``: staged validation (inputs, labels) tensors (CPU) for labelled data, else the validation batches (a
    list, collated by ``collate_fn``). ``collate_fn``: the user's DataLoader's, so epoch batches have the
    structure the user's data has (None: torch's default). ``fmt``/``metric``: how a batch is read
    (hetcomp.data) and what validation scores (hetcomp.metrics; None: top-1 accuracy).
    """

    train: Dataset
    val: Any
    batch_size: int
    checked: bool = True  # the training tensors were checked whole; else ``batches`` checks each batch
    class_labels: bool = True  # the default loss: labels must be integer class indices
    collate_fn: Callable[[list[Any]], Any] | None = None
    fmt: DataFormat = field(default_factory=DataFormat)
    metric: Any = None
    _staged: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # training tensors on a device

    def epoch_loader(self, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=self.collate_fn)

    def epoch_indices(self, seed: int) -> list[list[int]]:
        """The epoch's global batches as indices into ``train``: exactly those ``epoch_loader(seed)`` deals (the
        same seeded, shuffled DataLoader, over the indices, so it makes the same generator draws)."""
        order = DataLoader(range(len(self.train)), batch_size=self.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(seed))
        return [batch.tolist() for batch in order]

    def batches(self, seed: int) -> Iterator[Any]:
        """The epoch's batches ((inputs, labels) pairs for labelled data), each checked (DataError) unless the data
        was checked whole."""
        for shard in self.shards(seed):
            yield shard.batch

    def shards(self, seed: int, rank: int = 0, world: int = 1, device: torch.device | None = None
               ) -> Iterator[Shard]:
        """This rank's part of each of the epoch's global batches (all of it in one process), checked as
        ``batches`` checks. Global batch b of n samples is cut into ``world`` contiguous slices (sizes differ by
        at most one); rank r gets slice r with ``weight = world * len(slice) / n``, the factor that makes the
        mean of the ranks' weighted mean losses (DistributedDataParallel averages gradients) the mean over the
        global batch. A batch of fewer samples than ranks (only a short last batch, as ``batch_size >= world``)
        goes whole to every rank (``whole``: train it without gradient averaging; every rank computes the
        same step).

        Tensor data (a TensorDataset, or a Subset of one, exactly those classes: a subclass may override
        ``__getitem__``; collated by torch's default) is not read sample by sample: a batch is the list of its
        tensors indexed by the batch's samples (what the DataLoader would collate), taken one batch at a time, on
        ``device`` when given and the tensors fit ``STAGE_BYTES`` there (staged once, kept for the next epochs and
        stages), so a step neither collates nor copies its batch from host memory."""
        global_batches = self.epoch_indices(seed)
        parts = global_batches if world == 1 else [_slice(batch, rank, world) for batch in global_batches]
        tensors = self._tensors(device)
        if tensors is not None:
            order = torch.tensor([i for part in parts for i in part], dtype=torch.long)
            if type(self.train) is Subset:
                order = torch.as_tensor(self.train.indices, dtype=torch.long)[order]
            orders = {t.device: order.to(t.device) for t in tensors}  # each tensor indexed on its own device
            starts = itertools.accumulate((len(part) for part in parts), initial=0)
            batches = ([t[orders[t.device][start : start + len(part)]] for t in tensors]
                       for start, part in zip(starts, parts))
        elif world == 1:  # one process: the loader itself
            batches = self.epoch_loader(seed)
        else:
            # Fetches and collates this rank's samples only. Its own generator: a DataLoader without one draws its
            # worker seed from torch's global RNG, which is the training-noise stream every rank keeps in step.
            batches = DataLoader(self.train, batch_sampler=parts, generator=torch.Generator(),
                                 collate_fn=self.collate_fn)
        for index, (batch, part) in enumerate(zip(batches, parts, strict=True)):
            total = len(global_batches[index])
            whole = total < world
            yield self._shard(batch, index, 1.0 if whole else world * len(part) / total, whole)

    def _tensors(self, device: torch.device | None) -> tuple[torch.Tensor, ...] | None:
        """The tensors of tensor data read with torch's default collation (see ``shards``), on ``device`` when they
        fit ``STAGE_BYTES`` (else where they are); None for other data."""
        dataset = self.train.dataset if type(self.train) is Subset else self.train
        if self.collate_fn is not None or type(dataset) is not TensorDataset:
            return None
        tensors = dataset.tensors
        if device is None or all(t.device == device for t in tensors) or nbytes(tensors) > STAGE_BYTES:
            return tensors
        key = (id(dataset), str(device))
        if key not in self._staged:
            self._staged.clear()  # one staged copy at a time
            self._staged[key] = tuple(t.to(device) for t in tensors)
        return self._staged[key]

    def _shard(self, batch: Any, index: int, weight: float, whole: bool) -> Shard:
        """The batch as a Shard, checked unless the data was checked whole."""
        if self.fmt.labelled(batch):
            if not self.checked:
                checks.batches("training data", [batch[:2]], self.class_labels, start=index)
            return Shard(batch[0], batch[1], weight, whole, (batch[0], batch[1]))
        if not self.checked:
            self.fmt.check(f"training data batch {index}", batch, labels=False)
        return Shard(None, None, weight, whole, batch)


class Shard(NamedTuple):
    """One rank's part of a global training batch (``TrainingData.shards``). ``batch`` is what the data format
    reads (hetcomp.data): ``(inputs, labels)`` for labelled data, whose ``inputs`` and ``labels`` are also given
    apart; for other batch structures those two are None."""

    inputs: torch.Tensor | None
    labels: torch.Tensor | None
    weight: float  # multiplies this rank's mean loss: world * samples here / samples in the global batch
    whole: bool  # every rank holds the whole global batch (one process, or a batch smaller than the world)
    batch: Any = None


def _slice(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of ``batch`` (the first ``len % world`` slices one longer), or the whole
    batch when it has fewer samples than ranks."""
    if len(batch) < world:
        return batch
    size, extra = divmod(len(batch), world)
    start = rank * size + min(rank, extra)
    return batch[start : start + size + (rank < extra)]


def training_split(data: Any, val_data: Any = None, val_fraction: float = 0.1, seed: int = 0,
                   batch_size: int | None = None, class_labels: bool = True, fmt: DataFormat | None = None,
                   metric: Any = None) -> TrainingData:
    """Split ``data`` (a DataLoader over a map-style dataset, or an (inputs, labels) tensor pair).
    ``class_labels``: the loss is the default cross-entropy, so labels must be integer class indices.

    ``fmt``, ``metric`` (hetcomp.data, hetcomp.metrics): batches of any structure are read through ``fmt``, and
    validation is then the DataLoader's own batches (its ``collate_fn``) of the validation split; a general batch
    needs a loss of the user's (``class_labels`` False; else ConfigError, before training)."""
    batch_size = checks.integer("batch_size", batch_size, optional=True)
    fmt = fmt or DataFormat()
    collate_fn = None
    if isinstance(data, DataLoader):
        dataset = data.dataset
        batch_size = batch_size or data.batch_size or 64
        collate_fn = data.collate_fn if data.collate_fn is not default_collate else None
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError("fine-tuning needs a DataLoader over a map-style dataset (with __len__ and "
                              "__getitem__) so that it can split off validation data and reshuffle per epoch")
    elif tensor_pair(data) is not None:
        dataset = TensorDataset(*tensor_pair(data))
        batch_size = batch_size or 64
    else:
        raise ConfigError("fine-tuning needs data= as a DataLoader or an (inputs, labels) tensor pair, "
                          f"got {type(data).__name__}")
    first = None if isinstance(data, DataLoader) and fmt.inputs_fn is None and collate_fn is None \
        and whole_tensors(data) is not None else _first_batch(dataset, collate_fn)
    general = first is not None and not fmt.labelled(first)
    if general and class_labels:  # class_labels: no loss_fn was given
        raise needs_loss(first)
    whole = whole_tensors(data)
    if whole is not None:
        fmt.check("training data", whole, class_labels and fmt.labelled(whole))
    task = {"collate_fn": collate_fn, "fmt": fmt, "metric": metric}
    if val_data is not None:
        val = list(take_batches(val_data, None, what="validation data (val_data)", fmt=fmt)) if general else \
            staged(val_data, torch.device("cpu"), "validation data (val_data)")
        return TrainingData(dataset, val, batch_size, whole is not None, class_labels, **task)
    checks.real("val_fraction", val_fraction, 0.0, True, 1.0, True)
    n_val = max(1, int(round(len(dataset) * val_fraction)))
    if n_val >= len(dataset):
        raise ConfigError(f"{len(dataset)} training samples are too few to split off {val_fraction:.0%} validation")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    val = Subset(dataset, order[:n_val])
    train = Subset(dataset, order[n_val:])
    what = f"validation data ({val_fraction:.0%} split of data)"
    if general:  # the user's own batches (a whole-dataset metric sees every validation sample)
        loader = DataLoader(val, batch_size=batch_size, collate_fn=collate_fn)
        return TrainingData(train, take_batches(loader, None, what=what, fmt=fmt), batch_size, whole is not None,
                            class_labels, **task)
    val_tensors = staged(DataLoader(val, batch_size=max(batch_size, 256), collate_fn=collate_fn),
                         torch.device("cpu"), what)
    return TrainingData(train, val_tensors, batch_size, whole is not None, class_labels, **task)


def _first_batch(dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None) -> Any:
    """A batch of the dataset's first sample, as the training loader would collate it (to tell its structure)."""
    if len(dataset) == 0:
        raise ConfigError("fine-tuning data is empty; pass a non-empty dataset")
    return (collate_fn or default_collate)([dataset[0]])
