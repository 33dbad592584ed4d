"""Layer-wise Analog Fine-Tuning (HILAL Algorithm 1), checkpointed and resumable.

The analog-assigned layers, ordered by increasing HNI (most robust first), are added one per stage
to the set of lowered layers; each stage fine-tunes with noise injection (``train_stage``) for up to
``epochs`` epochs, early-stopping after ``patience`` epochs without validation gain, optionally with
cosine learning-rate decay. Stage 1 starts from the FP weights of the model being compiled (HILAL
never starts from an analog-trained model); stage t starts from stage t-1's validation-best weights,
reloaded from its checkpoint, so a run that is resumed computes exactly what an uninterrupted run does.

Checkpoints (hetcomp.storage.StepLog, the mechanism the mac-greedy search and row remap use too): after
each stage, ``<checkpoint_dir>/<run key>/step-NN.safetensors`` (the digital-equivalent state dict) and
``progress.json`` (the stages' records and each stage file's size and SHA-256), written atomically. The run
key (``training_run_key``) hashes everything a stage depends on, so ``resume=True`` only ever picks up the
same run (a changed model, data, target or setting starts a new run in a folder of its own), and a stage
file that does not match its checksum is refused (CheckpointError) rather than loaded; ``resume=False``
starts the run over.

Under torch.distributed (the same script under torchrun) the stages stay sequential and each one trains
data-parallel over the ranks (``train_stage``: DistributedDataParallel, every rank a slice of each global
batch of ``batch_size``); rank 0 alone writes the checkpoints and every rank reads them on resume (StepLog),
so a run killed under torchrun resumes under torchrun (with any number of ranks) after its last finished
stage. Every rank ends with the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis.cache import WEIGHTS
from hetcomp.errors import ConfigError
from hetcomp.finetune.data import TrainingData, training_split
from hetcomp.finetune.stage import StageSettings, derive_seed, train_stage
from hetcomp.graph.layers import mappable_nodes
from hetcomp.manifest import data_hash, fingerprint
from hetcomp.passes.base import CompileContext, Pass
from hetcomp.storage import StepLog, run_key
from hetcomp.storage.checkpoints import describe_callable


@dataclass
class LAFT(Pass):
    """Settings of layer-wise analog fine-tuning; pass as ``hetcomp.compile(..., finetune=LAFT(...))``.

    epochs / patience: E and P of Algorithm 1 (per stage). lr_analog / lr_digital / momentum: AnalogSGD
    (HILAL: 1e-3 / 1e-2 / 0.85). lr_decay: cosine decay over a stage's epochs. Validation: ``val_data``
    if given, else a seeded ``val_fraction`` split of the compile ``data``; ``val_repeats`` noisy passes
    per validation. checkpoint_dir: where stage checkpoints go (``build/laft`` by default; None keeps
    them in memory only). ``stop_after``: stop after that many stages in this call (for time-boxed
    runs: call again with ``resume=True`` to continue). ``sync_batchnorm``: under torch.distributed,
    BatchNorm normalizes by the global batch's statistics (one process's training: hetcomp.finetune.global_batchnorm,
    on CUDA and the CPU); False keeps each rank's slice's statistics (torch DDP's
    default), which saves two collectives per BatchNorm layer and step but trains differently from one process
    (README, Scaling).
    """

    epochs: int = 10
    patience: int = 3
    lr_analog: float = 1e-3
    lr_digital: float = 1e-2
    momentum: float = 0.85
    lr_decay: bool = True
    val_fraction: float = 0.1
    val_data: Any = None
    val_repeats: int = 3
    val_t_inference: float | None = 86400.0
    batch_size: int | None = None
    checkpoint_dir: str | Path | None = "build/laft"
    resume: bool = True
    stop_after: int | None = None
    sync_batchnorm: bool = True

    name = "laft"
    requires = ("assignment", "hni")
    provides = ("finetuned",)
    changes = frozenset({WEIGHTS})  # fine-tuning changes weights, not the graph

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first invalid setting (run at construction and again by compile, so a
        setting changed after construction is checked before any work too)."""
        for field_name in ("epochs", "patience", "val_repeats"):
            checks.integer(f"LAFT {field_name}", getattr(self, field_name))
        for field_name in ("lr_analog", "lr_digital"):
            checks.real(f"LAFT {field_name}", getattr(self, field_name), 0.0, exclusive=True)
        checks.real("LAFT momentum", self.momentum, 0.0)
        checks.boolean("LAFT lr_decay", self.lr_decay)
        checks.real("LAFT val_fraction", self.val_fraction, 0.0, True, 1.0, True)
        checks.real("LAFT val_t_inference (seconds; None: read noise only)", self.val_t_inference, 0.0,
                    optional=True)
        checks.integer("LAFT batch_size (None: the DataLoader's)", self.batch_size, optional=True)
        checks.path_or_none("LAFT checkpoint_dir", self.checkpoint_dir)
        checks.boolean("LAFT resume", self.resume)
        checks.integer("LAFT stop_after (None: run every stage)", self.stop_after, optional=True)
        checks.boolean("LAFT sync_batchnorm", self.sync_batchnorm)

    def stage_settings(self) -> StageSettings:
        return StageSettings(self.epochs, self.patience, self.lr_analog, self.lr_digital, self.momentum,
                             self.lr_decay, self.val_repeats, self.val_t_inference, self.sync_batchnorm)

    def settings(self) -> dict:
        return {"epochs": self.epochs, "patience": self.patience, "lr_analog": self.lr_analog,
                "lr_digital": self.lr_digital, "momentum": self.momentum, "lr_decay": self.lr_decay,
                "val_fraction": None if self.val_data is not None else self.val_fraction,
                "val_data": self.val_data is not None, "val_repeats": self.val_repeats,
                "val_t_inference": self.val_t_inference,
                "batch_size": self.batch_size,
                # only when off, so that runs (and checkpoints) made before the setting existed keep their keys
                **({} if self.sync_batchnorm else {"sync_batchnorm": False})}

    def order(self, gm: fx.GraphModule, ctx: CompileContext) -> list[str]:
        """Analog-assigned layers by increasing HNI (most robust first; undefined HNI last)."""
        analog = {t.name for t in ctx.targets.analog}
        chosen = [a for _, a in mappable_nodes(gm) if isinstance(a.assignment, str) and a.assignment in analog
                  or isinstance(a.assignment, dict) and any(n and t in analog for t, n in a.assignment.items())]

        def key(annotation: Any) -> tuple[bool, float]:
            hni = annotation.metrics.get("hni")
            undefined = not (isinstance(hni, float) and math.isfinite(hni))
            return undefined, 0.0 if undefined else hni

        return [a.layer.name for a in sorted(chosen, key=key)]

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        _check_trainable(gm, ctx)
        order = self.order(gm, ctx)
        data = training_split(ctx.data, self.val_data, self.val_fraction, ctx.seed, self.batch_size,
                              class_labels=ctx.loss_fn is None, fmt=ctx.fmt, metric=ctx.config.metric)
        log = StepLog(self.checkpoint_dir, training_run_key(gm, ctx, data, method="laft", order=order,
                                                            settings=self.settings()), "LAFT")
        records = log.resume() if self.resume else log.restart()
        done = len(records)
        # Stage 1 starts from the FP weights; a resumed run starts from the last finished checkpoint.
        fp_state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        state = log.latest_tensors(fp_state)
        state = fp_state if state is None else state
        for index in range(done, len(order)):
            if self.stop_after is not None and index - done >= self.stop_after:
                break
            gm.load_state_dict(state)
            result = train_stage(
                gm, ctx.targets, order[: index + 1], data, self.stage_settings(), ctx.loss,
                derive_seed(ctx.seed, "laft", index), desc=f"LAFT stage {index + 1}/{len(order)} (+{order[index]})")
            records.append(result.record())
            log.append(records[-1], result.state)
            state = result.state
        gm.load_state_dict(state)
        ctx.manifest_extra["finetune"] = {
            "method": "laft", "metric": ctx.metric.name, "order": order, "stages": records,
            "complete": len(records) == len(order),
            "checkpoints": None if log.directory is None else str(log.directory)}
        return gm


def training_run_key(gm: fx.GraphModule, ctx: CompileContext, data: TrainingData, **parts: Any) -> str:
    """Run key of a fine-tuning search (LAFT, mac-greedy): the weights and architecture, the targets' full
    parameters (lowering settings included), seed, loss, the data (sizes; a hash of the validation tensors
    and the first training batch) and ``parts`` (method, order, settings...); hetcomp.storage.run_key adds
    hetcomp's version and the checkpoint format."""
    first_batch = next(iter(data.epoch_loader(0)))
    if data.fmt.labelled(first_batch):
        sizes, hashed = len(data.val[1]), [tuple(data.val), tuple(first_batch[:2])]
    else:  # batches of any structure (hetcomp.data), and how they are read
        sizes, hashed = sum(data.fmt.samples(batch) for batch in data.val), [list(data.val), first_batch]
        parts = {**parts, "inputs": describe_callable(ctx.config.inputs_fn)}
    if ctx.config.metric is not None:  # validation scores another metric than top-1 accuracy
        parts = {**parts, "metric": _describe_metric(ctx)}
    return run_key({
        "model": fingerprint(gm, gm), "targets": [t.to_dict() for t in ctx.targets], "seed": ctx.seed,
        "loss": describe_callable(ctx.loss_fn), "data": [len(data.train), sizes, data_hash(hashed)], **parts,
    })


def _describe_metric(ctx: CompileContext) -> str:
    """A run key's record of the validation metric: its class and name, and its functions' code."""
    metric = ctx.metric
    functions = [getattr(metric, name) for name in ("fn", "collect", "compute") if hasattr(metric, name)]
    return f"{type(metric).__qualname__}:{metric.name}:" + ";".join(describe_callable(f) for f in functions)


def _check_trainable(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """LAFT trains through simulators that pass gradients to the weights (aihwkit; the tier simulators by LSQ;
    row-split layers: ``row_split_trainable``); refuse, before any
    training, layers it would silently leave untrained."""
    from hetcomp.lower import row_split_trainable, simulator_of

    problems = []
    users: dict[str, list[str]] = {}  # weight parameter -> the layers that read it
    for _, annotation in mappable_nodes(gm):
        if annotation.layer.weight_param is not None:
            users.setdefault(annotation.layer.weight_param, []).append(annotation.layer.name)
    for _, annotation in mappable_nodes(gm):
        assignment = annotation.assignment
        shared = users.get(annotation.layer.weight_param or "", [])
        if isinstance(assignment, str) and ctx.targets[assignment].analog and len(shared) > 1:
            problems.append(f"{annotation.layer.name} (its weights {annotation.layer.weight_param!r} are shared with "
                            f"{', '.join(n for n in shared if n != annotation.layer.name)}: one weight cannot be "
                            "fine-tuned as two layers)")
        if isinstance(assignment, dict):
            if not row_split_trainable(assignment, ctx.targets):
                problems.append(f"{annotation.layer.name} (row-split over {'+'.join(assignment)})")
        elif assignment is not None and ctx.targets[assignment].analog:
            simulator = simulator_of(ctx.targets[assignment])
            if simulator is not None and not simulator.trainable:
                problems.append(f"{annotation.layer.name} (on {assignment}, simulator {simulator.name})")
    if problems:
        raise ConfigError(
            f"LAFT cannot fine-tune {', '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}: it trains "
            "layers through simulators that pass gradients (aihwkit PCM; the tier simulators, by LSQ; a row-split "
            "layer when none of its tiers needs an optimizer of its own), each with weights of its own; compile "
            "without finetune= for these layers (or keep them digital)")
