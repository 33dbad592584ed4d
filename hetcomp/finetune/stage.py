"""One fine-tuning stage: lower a set of layers, train with noise injection, keep the validation-best.

Shared by LAFT (one stage per added layer) and the ``mac-greedy`` search (one stage per candidate).
The stage starts from the digital graph's weights, lowers ``analog_layers`` (aihwkit applies the
training-noise modifier to analog weights in train mode), trains with AnalogSGD (separate learning
rates for analog and digital parameters), validates after every epoch in eval mode (read/ADC noise,
no drift), and stops after ``patience`` epochs without gain. The pre-training validation score is
the initial best, so a stage never returns weights worse on validation than those it started from.

Under torch.distributed (``hetcomp.distributed.active()``) the stage trains data-parallel: the lowered model is
wrapped in ``DistributedDataParallel`` (on its own device: each rank's model on its GPU with NCCL, on the CPU with
gloo), every rank trains on its slice of each global batch of ``batch_size`` samples (``TrainingData.shards``, the
same global batches as one process) and DDP averages the gradients, so the stage computes what one process computes,
up to float reduction order (a mean-reduced loss is assumed, as cross-entropy's default; a loss that compares the
batch's samples with each other gathers the global batch with ``hetcomp.distributed.gather_batch``, as ``info_nce``
does). aihwkit's ``AnalogContext`` parameters are left out of DDP: they are placeholder views of the tile's own
weight parameter (the torch tile's ``tile.weight``, the C++ InferenceTile's ``shared_weights``), which DDP averages
like any parameter. Every rank seeds the training noise as one process does, so a weight-noise draw (one per batch,
the same for all its samples) is the same on every rank and the same as one process's; noise drawn per sample
(aihwkit's output noise ``out_noise``, dropout) is drawn per rank, so with it the run differs from one process (see
the README's Scaling section). BatchNorm normalizes by the global batch's statistics (one process's training:
``GlobalBatchNorm``, torch's SyncBatchNorm without its per-layer host synchronization, on CUDA and the CPU);
``sync_batchnorm=False`` keeps each rank's slice's statistics (faster; the running statistics are then rank 0's).
Validation is ``validation_accuracy`` (the sharded evaluation when it programs and drifts; whole on every rank with
``val_t_inference=None``), rank 0's score decides, and the stage returns rank 0's weights on every rank (identical
anyway: every rank applied the same averaged update).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from hetcomp import distributed
from hetcomp.data import DataFormat, move, tensor_pair
from hetcomp.errors import ConfigError
from hetcomp.evaluate import accuracy_labels, batched_logits, evaluate
from hetcomp.finetune.data import TrainingData
from hetcomp.finetune.global_batchnorm import GlobalBatchNorm
from hetcomp.graph.calls import set_training, unread_parameters
from hetcomp.lower import Simulator, digital_state_dict, lower_graph, lowered_modules
from hetcomp.progress import bar
from hetcomp.targets.base import TargetSet


def derive_seed(seed: int, *keys: Any) -> int:
    """A seed for a sub-step (stage, epoch, ...) that depends only on ``seed`` and the keys."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


@dataclass
class StageSettings:
    epochs: int
    patience: int
    lr_analog: float
    lr_digital: float
    momentum: float
    lr_decay: bool
    val_repeats: int
    val_t_inference: float | None  # None: read/ADC noise only; else programmed and drifted to this time
    sync_batchnorm: bool = True  # under torch.distributed: BatchNorm over the global batch (stage._batchnorm)


@dataclass
class StageResult:
    layers: list[str]
    start_val: float
    best_val: float
    best_epoch: int  # 0: no epoch beat the starting weights
    epochs: int
    history: list[float]
    seconds: float
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    ranks: int = 1  # data-parallel ranks the stage trained on (torch.distributed world size)

    def record(self) -> dict[str, Any]:
        record = {"layers": self.layers, "start_val": self.start_val, "best_val": self.best_val,
                  "best_epoch": self.best_epoch, "epochs": self.epochs, "history": self.history,
                  "seconds": round(self.seconds, 3)}
        return record if self.ranks == 1 else {**record, "ranks": self.ranks}


def validation_accuracy(module: torch.nn.Module, val: Any, repeats: int, seed: int, t_inference: float | None = None,
                        report: dict | None = None, batch_size: int = 256, metric: Any = None,
                        fmt: DataFormat | None = None) -> float:
    """The mean validation score over ``repeats`` noisy passes, seeded: top-1 accuracy on staged (inputs, labels)
    tensors, or ``metric`` (hetcomp.metrics) on batches read by ``fmt`` (hetcomp.data).

    ``t_inference=None``: eval-mode forward noise only (read noise, ADC). Otherwise each repeat is programmed
    and drifted (``evaluate``: repeat-vectorized, and it never changes ``module``).
    """
    inputs_fn = None if fmt is None else fmt.inputs_fn
    if t_inference is not None and report is not None and lowered_modules(report):
        return evaluate(module, report, val, repeats=repeats, t_inference=t_inference,
                        seed=seed, batch_size=batch_size, metric=metric, inputs_fn=inputs_fn).mean
    device = next(module.parameters()).device
    if metric is not None or inputs_fn is not None or tensor_pair(val) is None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # one seeded noise stream over the passes, as below
            values = [evaluate(module, {}, val, repeats=1, batch_size=batch_size, metric=metric,
                               inputs_fn=inputs_fn).mean for _ in range(repeats)]
        return sum(values) / len(values)
    was_training = module.training
    set_training(module, False)
    inputs, labels = val[0].to(device), val[1].to(device)
    correct = 0
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for repeat in range(repeats):
            logits = batched_logits(module, inputs, batch_size)
            if repeat == 0:
                accuracy_labels(logits, labels, "validation data")
            correct += int((logits.argmax(-1) == labels).sum())
    set_training(module, was_training)
    return correct / (len(labels) * repeats)


def train_stage(gm: fx.GraphModule, targets: TargetSet, analog_layers: Sequence[str], data: TrainingData,
                settings: StageSettings, loss_fn: Callable, seed: int, desc: str) -> StageResult:
    """Fine-tune ``gm`` with ``analog_layers`` lowered; returns the validation-best digital state. The optimizer
    is the lowered layers' simulator's (aihwkit: AnalogSGD; one simulator per stage: LAFT checks it). Under
    torch.distributed it trains data-parallel over the ranks and returns the same result on every rank."""
    start = time.perf_counter()
    world = distributed.world_size()
    if world > 1 and data.batch_size < world:
        raise ConfigError(f"fine-tuning batch_size {data.batch_size} is smaller than the {world} torch.distributed "
                          f"ranks: every rank would train on every sample; use batch_size >= {world} (the global "
                          "batch: each rank trains on batch_size / world samples of it)")
    lowered, report = lower_graph(gm, targets, layers=analog_layers)
    device = next(lowered.parameters()).device
    analog_prefixes = tuple(name + "." for name in lowered_modules(report))
    unread = unread_parameters(lowered)  # digital weights lowered at their node: no gradient, nothing to train
    analog_params, digital_params = [], []
    for name, parameter in lowered.named_parameters():
        if name not in unread:
            (analog_params if name.startswith(analog_prefixes) else digital_params).append(parameter)
    groups = [{"params": analog_params, "lr": settings.lr_analog}]
    if digital_params:
        groups.append({"params": digital_params, "lr": settings.lr_digital})
    # Layers of several simulators train together when they share one update rule (e.g. the base class's SGD).
    simulators = {type(simulator).optimizer: simulator for simulator in lowered_modules(report).values()}
    if len(simulators) > 1:
        names = sorted(each.name for each in simulators.values())
        raise ConfigError(f"one fine-tuning stage trains layers of several simulators ({names}) with optimizers of "
                          "their own; fine-tune one "
                          "device's layers at a time")
    simulator = next(iter(simulators.values()), Simulator())
    # DDP wraps the model before the optimizer is built
    model = _data_parallel(lowered, device, settings.sync_batchnorm, unread) if world > 1 else lowered
    optimizer = simulator.optimizer(groups, lr=settings.lr_analog, momentum=settings.momentum)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
                 if settings.lr_decay else None)
    val_seed = derive_seed(seed, "validation")
    best_val = start_val = _validate(lowered, data, settings, val_seed, report)
    best_state = digital_state_dict(lowered, report)
    best_epoch, since_best, history = 0, 0, []
    progress_bar = bar(settings.epochs, desc)
    rank = distributed.rank()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # The same noise seed on every rank: a per-batch weight-noise draw is the one a single process makes.
        torch.manual_seed(derive_seed(seed, "noise"))
        for epoch in range(1, settings.epochs + 1):
            set_training(lowered, True)
            for shard in data.shards(derive_seed(seed, "epoch", epoch), rank, world, device):
                optimizer.zero_grad()
                # A batch every rank holds whole: the same step on every rank, no gradient averaging needed. Else a
                # slice per rank: distributed.gather_batch then gathers the global batch for in-batch losses.
                with (model.no_sync() if world > 1 and shard.whole else contextlib.nullcontext(),
                      distributed.sliced_batch(not shard.whole)):
                    batch = move(shard.batch, device)
                    args, kwargs = data.fmt.inputs(batch)
                    loss = data.fmt.loss(loss_fn, model(*args, **kwargs), batch)
                    if shard.weight != 1.0:  # a last batch that does not divide evenly over the ranks
                        loss = loss * shard.weight
                    loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            val = _validate(lowered, data, settings, val_seed, report)
            history.append(val)
            progress_bar.update(1)
            progress_bar.set_postfix(val=f"{val:.4f}", best=f"{max(best_val, val):.4f}")
            if val > best_val:
                best_val, best_epoch, since_best = val, epoch, 0
                best_state = digital_state_dict(lowered, report)
            else:
                since_best += 1
                if since_best >= settings.patience:
                    break
    progress_bar.close()
    distributed.broadcast_tensors(best_state.values())  # rank 0's weights on every rank (bitwise the same)
    return StageResult(list(analog_layers), start_val, best_val, best_epoch, len(history), history,
                       time.perf_counter() - start, best_state, world)


def _validate(lowered: fx.GraphModule, data: TrainingData, settings: StageSettings, seed: int,
              report: dict) -> float:
    """``validation_accuracy`` of the lowered model; under torch.distributed after rank 0's buffers (BatchNorm
    running statistics, which a CPU run updates per rank) are copied to every rank, and rank 0's score is
    every rank's, so that early stopping takes the same branch on every rank."""
    distributed.broadcast_tensors(buffer for _, buffer in sorted(lowered.named_buffers()))
    score = validation_accuracy(lowered, data.val, settings.val_repeats, seed, settings.val_t_inference, report,
                                metric=data.metric, fmt=data.fmt)
    return distributed.on_main(lambda: score)


def _data_parallel(lowered: fx.GraphModule, device: torch.device, sync_batchnorm: bool = True,
                   unread: Sequence[str] = ()) -> torch.nn.Module:
    """``lowered`` wrapped in DistributedDataParallel for this rank's device (BatchNorm over the global batch unless
    ``sync_batchnorm`` is False). Left out: aihwkit's AnalogContext placeholders (the tile's own weight parameter
    carries the gradient) and the ``unread`` parameters (``unread_parameters``: the graph never reads them)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cpu" and dist.get_backend() == "nccl":
        raise ConfigError("fine-tuning under torch.distributed with NCCL needs each rank's model on its GPU "
                          "(model.to(f'cuda:{LOCAL_RANK}') before compile); a CPU model trains with gloo")
    ignored = list(unread)
    for module in lowered.modules():
        if getattr(module, "supports_ddp", True) is False:  # aihwkit's analog training tiles
            raise ConfigError(f"aihwkit tile {type(module).__name__} cannot train under DistributedDataParallel; "
                              "use an inference tile (tile='torch', the default, or 'cpp') or one process")
    for name, parameter in lowered.named_parameters():
        if type(parameter).__name__ == "AnalogContext":
            ignored.append(name)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(lowered, ignored)
    lowered = _batchnorm(lowered, sync_batchnorm)
    # No buffer broadcast before every forward: train-mode forwards read no buffer a rank changes (BatchNorm uses
    # the batch's statistics; hetcomp's aihwkit settings learn no input range), and _validate broadcasts rank 0's
    # buffers before every validation, the first step included. Newer torch calls it forward_sync_buffers.
    no_forward_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else {"broadcast_buffers": False}
    return DistributedDataParallel(lowered, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_forward_sync)


def _batchnorm(lowered: fx.GraphModule, sync: bool) -> torch.nn.Module:
    """``lowered`` with its BatchNorm layers normalizing by the global batch (one process's training) when ``sync``:
    hetcomp's GlobalBatchNorm (torch's SyncBatchNorm without its host synchronization per layer, and on the CPU too);
    else as they are (each rank's slice's statistics, torch DDP's default: faster a step, bench/laft_steps.py)."""
    if not sync:
        return lowered
    return GlobalBatchNorm.convert(lowered)
