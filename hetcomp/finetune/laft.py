"""Layer-wise Analog Fine-Tuning (HILAL Algorithm 1), checkpointed and resumable.

The analog-assigned layers, ordered by increasing HNI (most robust first), are added one per stage
to the set of lowered layers; each stage fine-tunes with noise injection (``train_stage``) for up to
``epochs`` epochs, early-stopping after ``patience`` epochs without validation gain, optionally with
cosine learning-rate decay. Stage 1 starts from the FP weights of the model being compiled (HILAL
never starts from an analog-trained model); stage t starts from stage t-1's validation-best weights,
reloaded from its checkpoint, so a run that is resumed computes exactly what an uninterrupted run does.

Checkpoints: ``<checkpoint_dir>/<run key>/stage-NN.pt`` (the digital-equivalent state dict, plain
tensors, loaded with ``weights_only=True``) and ``progress.json`` (finished stages), both written
atomically after each stage. The run key hashes everything a stage depends on (see ``_run_key``), so
``resume=True`` only ever picks up the same run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from hetcomp.errors import ConfigError
from hetcomp.finetune.data import TrainingData, training_split
from hetcomp.finetune.stage import StageResult, StageSettings, derive_seed, train_stage
from hetcomp.graph.layers import mappable_nodes
from hetcomp.manifest import fingerprint, write_atomic
from hetcomp.passes.base import CompileContext, Pass


@dataclass
class LAFT(Pass):
    """Settings of layer-wise analog fine-tuning; pass as ``hetcomp.compile(..., finetune=LAFT(...))``.

    epochs / patience: E and P of Algorithm 1 (per stage). lr_analog / lr_digital / momentum: AnalogSGD
    (HILAL: 1e-3 / 1e-2 / 0.85). lr_decay: cosine decay over a stage's epochs. Validation: ``val_data``
    if given, else a seeded ``val_fraction`` split of the compile ``data``; ``val_repeats`` noisy passes
    per validation. checkpoint_dir: where stage checkpoints go (``build/laft`` by default; None keeps
    them in memory only). ``stop_after``: stop after that many stages in this call (for time-boxed
    runs: call again with ``resume=True`` to continue).
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

    name = "laft"
    requires = ("assignment", "hni")
    provides = ("finetuned",)
    modifies_graph = True

    def __post_init__(self) -> None:
        for field_name in ("epochs", "patience", "val_repeats"):
            if getattr(self, field_name) < 1:
                raise ConfigError(f"LAFT {field_name} must be >= 1, got {getattr(self, field_name)}")
        for field_name in ("lr_analog", "lr_digital"):
            if not getattr(self, field_name) > 0:
                raise ConfigError(f"LAFT {field_name} must be > 0, got {getattr(self, field_name)}")

    def stage_settings(self) -> StageSettings:
        return StageSettings(self.epochs, self.patience, self.lr_analog, self.lr_digital, self.momentum,
                             self.lr_decay, self.val_repeats, self.val_t_inference)

    def settings(self) -> dict:
        return {"epochs": self.epochs, "patience": self.patience, "lr_analog": self.lr_analog,
                "lr_digital": self.lr_digital, "momentum": self.momentum, "lr_decay": self.lr_decay,
                "val_fraction": None if self.val_data is not None else self.val_fraction,
                "val_data": self.val_data is not None, "val_repeats": self.val_repeats,
                "val_t_inference": self.val_t_inference,
                "batch_size": self.batch_size}

    def order(self, gm: fx.GraphModule, ctx: CompileContext) -> list[str]:
        """Analog-assigned layers by increasing HNI (most robust first; undefined HNI last)."""
        analog = {t.name for t in ctx.targets.analog}
        chosen = [a for _, a in mappable_nodes(gm) if isinstance(a.assignment, str) and a.assignment in analog]

        def key(annotation: Any) -> tuple[bool, float]:
            hni = annotation.metrics.get("hni")
            undefined = not (isinstance(hni, float) and math.isfinite(hni))
            return undefined, 0.0 if undefined else hni

        return [a.layer.name for a in sorted(chosen, key=key)]

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        order = self.order(gm, ctx)
        data = training_split(ctx.data, self.val_data, self.val_fraction, ctx.seed, self.batch_size)
        run_key = self._run_key(gm, ctx, order, data)
        directory = None if self.checkpoint_dir is None else Path(self.checkpoint_dir) / run_key
        finished = self._finished_stages(directory, run_key, order) if self.resume else []
        records = [stage["record"] for stage in finished]
        # Stage 1 starts from the FP weights; a resumed run starts from the last finished checkpoint.
        state = (self._load_stage(directory, len(finished) - 1) if finished else
                 {k: v.detach().clone() for k, v in gm.state_dict().items()})
        for index in range(len(finished), len(order)):
            if self.stop_after is not None and index - len(finished) >= self.stop_after:
                break
            gm.load_state_dict(state)
            result: StageResult = train_stage(
                gm, ctx.targets, order[: index + 1], data, self.stage_settings(), ctx.loss,
                derive_seed(ctx.seed, "laft", index), desc=f"LAFT stage {index + 1}/{len(order)} (+{order[index]})")
            records.append(result.record())
            if directory is not None:
                self._save_stage(directory, run_key, order, index, result, records)
            state = result.state
        gm.load_state_dict(state)
        ctx.manifest_extra["finetune"] = {
            "method": "laft", "order": order, "stages": records, "complete": len(records) == len(order),
            "checkpoints": None if directory is None else str(directory)}
        return gm

    # -- checkpoints -----------------------------------------------------------------------------

    def _run_key(self, gm: fx.GraphModule, ctx: CompileContext, order: list[str], data: TrainingData) -> str:
        """Everything a stage's result depends on: weights and architecture, layer order, the targets'
        full parameters (lowering settings included), settings, seed, loss, hetcomp's version, and the
        data (sizes, the validation tensors and the first training batch)."""
        from hetcomp import __version__

        data_hash = hashlib.sha256()
        first_batch = next(iter(data.epoch_loader(0)))
        for tensor in (*data.val, *first_batch[:2]):
            data_hash.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        description = json.dumps({
            "model": fingerprint(gm, gm), "order": order, "targets": [t.to_dict() for t in ctx.targets],
            "settings": self.settings(), "seed": ctx.seed, "loss": getattr(ctx.loss, "__qualname__", repr(ctx.loss)),
            "version": __version__, "data": [len(data.train), len(data.val[1]), data_hash.hexdigest()],
        }, sort_keys=True, default=str)
        return hashlib.sha256(description.encode()).hexdigest()[:16]

    def _finished_stages(self, directory: Path | None, run_key: str, order: list[str]) -> list[dict]:
        if directory is None or not (directory / "progress.json").exists():
            return []
        progress = json.loads((directory / "progress.json").read_text())
        if progress.get("run_key") != run_key or progress.get("order") != order:
            return []
        stages = []
        for index, record in enumerate(progress.get("stages", [])):
            if not (directory / f"stage-{index:02d}.pt").exists():
                break
            stages.append({"record": record})
        return stages

    def _save_stage(self, directory: Path, run_key: str, order: list[str], index: int, result: StageResult,
                    records: list[dict]) -> None:
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in result.state.items()}, buffer)
        write_atomic(directory / f"stage-{index:02d}.pt", buffer.getvalue())  # checkpoint before progress
        write_atomic(directory / "progress.json",
                     json.dumps({"run_key": run_key, "order": order, "stages": records}, indent=2))

    def _load_stage(self, directory: Path, index: int) -> dict[str, torch.Tensor]:
        return torch.load(directory / f"stage-{index:02d}.pt", weights_only=True, map_location="cpu")
