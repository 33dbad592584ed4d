"""Stage checkpoints shared by LAFT and the mac-greedy search: a killed run resumes after its last
finished stage.

``<root>/<run key>/stage-NN.pt`` holds the state dict after stage NN (plain tensors, loaded with
``weights_only=True``) and ``progress.json`` the finished stages' records, each written atomically,
checkpoint before progress. The run key hashes everything a stage's result depends on, so a resume
only ever picks up the same run.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from hetcomp.finetune.data import TrainingData
from hetcomp.manifest import fingerprint, write_atomic


def run_key(gm: fx.GraphModule, ctx: Any, data: TrainingData, **parts: Any) -> str:
    """Hash of the weights and architecture, the targets' full parameters (lowering settings included),
    seed, loss, hetcomp's version, the data (sizes, validation tensors, first training batch) and
    ``parts`` (method, order, settings...)."""
    from hetcomp import __version__

    data_hash = hashlib.sha256()
    first_batch = next(iter(data.epoch_loader(0)))
    for tensor in (*data.val, *first_batch[:2]):
        data_hash.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    description = json.dumps({
        "model": fingerprint(gm, gm), "targets": [t.to_dict() for t in ctx.targets], "seed": ctx.seed,
        "loss": getattr(ctx.loss, "__qualname__", repr(ctx.loss)), "version": __version__,
        "data": [len(data.train), len(data.val[1]), data_hash.hexdigest()], **parts,
    }, sort_keys=True, default=str)
    return hashlib.sha256(description.encode()).hexdigest()[:16]


class StageCheckpoints:
    """Checkpoints of one run; ``root=None`` keeps nothing (every method is then a no-op)."""

    def __init__(self, root: str | Path | None, key: str) -> None:
        self.key = key
        self.directory = None if root is None else Path(root) / key

    def finished(self) -> list[dict[str, Any]]:
        """Records of the finished stages (those whose checkpoint exists), in order."""
        if self.directory is None or not (self.directory / "progress.json").exists():
            return []
        progress = json.loads((self.directory / "progress.json").read_text())
        if progress.get("run_key") != self.key:
            return []
        records = []
        for index, record in enumerate(progress.get("stages", [])):
            if not (self.directory / f"stage-{index:02d}.pt").exists():
                break
            records.append(record)
        return records

    def save(self, index: int, state: dict[str, torch.Tensor], records: list[dict[str, Any]]) -> None:
        if self.directory is None:
            return
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
        write_atomic(self.directory / f"stage-{index:02d}.pt", buffer.getvalue())  # checkpoint before progress
        write_atomic(self.directory / "progress.json",
                     json.dumps({"run_key": self.key, "stages": records}, indent=2))

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return torch.load(self.directory / f"stage-{index:02d}.pt", weights_only=True, map_location="cpu")
