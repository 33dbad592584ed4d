"""Stage checkpoints shared by LAFT and the mac-greedy search: a killed run resumes after its last
finished stage.

``<root>/<run key>/stage-NN.safetensors`` holds the state dict after stage NN (safetensors: plain tensors,
no pickle) and ``progress.json`` the finished stages' records plus each stage file's name, size and
SHA-256; each file is written atomically (hetcomp.storage.write_atomic), checkpoint before progress.
The run key hashes everything a stage's result depends on, so a resume only ever picks up the same run.

On resume every listed stage file is verified against progress.json (present, same size, same SHA-256)
and the one loaded must parse, hold finite tensors and match the model's parameter names and shapes.
A truncated, empty, replaced or NaN-holding stage file, or a malformed progress.json, raises
``CheckpointError`` naming the file and the fix (``resume=False``, or delete the run's folder) instead of
being loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from hetcomp.errors import CheckpointError
from hetcomp.finetune.data import TrainingData
from hetcomp.manifest import fingerprint
from hetcomp.storage import sha256_bytes, sha256_file, write_atomic

FORMAT = 2  # 1: stage-NN.pt (torch.save), no checksums


def run_key(gm: fx.GraphModule, ctx: Any, data: TrainingData, **parts: Any) -> str:
    """Hash of the weights and architecture, the targets' full parameters (lowering settings included),
    seed, loss, hetcomp's version, the data (sizes, validation tensors, first training batch), the
    checkpoint format and ``parts`` (method, order, settings...)."""
    from hetcomp import __version__

    data_hash = hashlib.sha256()
    first_batch = next(iter(data.epoch_loader(0)))
    for tensor in (*data.val, *first_batch[:2]):
        data_hash.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    description = json.dumps({
        "model": fingerprint(gm, gm), "targets": [t.to_dict() for t in ctx.targets], "seed": ctx.seed,
        "loss": getattr(ctx.loss, "__qualname__", repr(ctx.loss)), "version": __version__,
        "data": [len(data.train), len(data.val[1]), data_hash.hexdigest()], "checkpoint_format": FORMAT, **parts,
    }, sort_keys=True, default=str)
    return hashlib.sha256(description.encode()).hexdigest()[:16]


def stage_file(index: int) -> str:
    return f"stage-{index:02d}.safetensors"


class StageCheckpoints:
    """Checkpoints of one run; ``root=None`` keeps nothing (every method is then a no-op).
    ``method`` names the run in errors ("LAFT", "mac-greedy")."""

    def __init__(self, root: str | Path | None, key: str, method: str = "LAFT") -> None:
        self.key = key
        self.method = method
        self.directory = None if root is None else Path(root) / key
        self._files: list[dict[str, Any]] = []  # per finished stage: file, bytes, sha256

    def _corrupted(self, name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.method} checkpoint {self.directory / name} is corrupted ({why}); resume "
                               f"with resume=False or delete {self.directory}")

    def finished(self) -> list[dict[str, Any]]:
        """Records of the finished stages, in order, after verifying every stage file against progress.json
        (CheckpointError if one is missing, truncated or replaced, or progress.json is malformed)."""
        self._files = []
        if self.directory is None or not (self.directory / "progress.json").exists():
            return []
        try:
            progress = json.loads((self.directory / "progress.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._corrupted("progress.json", f"not readable JSON: {error}") from None
        if not isinstance(progress, dict):
            raise self._corrupted("progress.json", f"a JSON {type(progress).__name__}, not an object")
        if progress.get("format") != FORMAT or progress.get("run_key") != self.key:
            raise self._corrupted("progress.json", f"format {progress.get('format')!r} and run key "
                                  f"{progress.get('run_key')!r}, expected format {FORMAT} and run key {self.key!r}")
        stages, files = progress.get("stages"), progress.get("files")
        if not isinstance(stages, list) or not isinstance(files, list) or len(stages) != len(files) or \
                not all(isinstance(r, dict) for r in stages):
            raise self._corrupted("progress.json", "'stages' and 'files' must be lists of one entry per stage")
        for index, entry in enumerate(files):
            name = stage_file(index)
            if not (isinstance(entry, dict) and entry.get("file") == name and isinstance(entry.get("bytes"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise self._corrupted("progress.json", f"entry {index} of 'files' is not "
                                      f"{{'file': {name!r}, 'bytes': <int>, 'sha256': <hex>}}")
            path = self.directory / name
            if not path.is_file():
                raise self._corrupted(name, "missing, but progress.json lists it")
            size = path.stat().st_size
            if size == 0:
                raise self._corrupted(name, "zero-length file")
            if size != entry["bytes"]:
                raise self._corrupted(name, f"{size} bytes, progress.json recorded {entry['bytes']}: truncated "
                                      "or replaced")
            if sha256_file(path) != entry["sha256"]:
                raise self._corrupted(name, "its SHA-256 does not match progress.json: modified or replaced")
        self._files = list(files)
        return list(stages)

    def save(self, index: int, state: dict[str, torch.Tensor], records: list[dict[str, Any]]) -> None:
        """Write stage ``index``'s state (safetensors), then progress.json listing the stages 0..index."""
        if self.directory is None:
            return
        from safetensors.torch import save as safetensors_bytes

        # Clones: safetensors refuses tensors that share storage (tied weights).
        content = safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})
        name = stage_file(index)
        write_atomic(self.directory / name, content)  # checkpoint before progress
        self._files = [*self._files[:index], {"file": name, "bytes": len(content), "sha256": sha256_bytes(content)}]
        write_atomic(self.directory / "progress.json", json.dumps(
            {"format": FORMAT, "run_key": self.key, "stages": records, "files": self._files}, indent=2))

    def load(self, index: int, expected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Stage ``index``'s state, verified: its checksum (as ``finished`` checked it), parseable, finite,
        and with ``expected``'s names and shapes (the model being fine-tuned)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as safetensors_load

        name = stage_file(index)
        if index >= len(self._files):
            raise self._corrupted(name, "not listed in progress.json")
        try:
            content = (self.directory / name).read_bytes()
        except OSError as error:
            raise self._corrupted(name, f"not readable: {error}") from None
        if sha256_bytes(content) != self._files[index]["sha256"]:
            raise self._corrupted(name, "its SHA-256 does not match progress.json: modified or replaced")
        try:
            state = safetensors_load(content)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise self._corrupted(name, f"not a safetensors file: {error}") from None
        for key, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise self._corrupted(name, f"tensor {key!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''}")
        if expected is not None:
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
            if missing or extra or shapes:
                what = "; ".join(part for part in (
                    f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                    f"other shapes for {shapes[:3]}" if shapes else "") if part)
                raise self._corrupted(name, f"it holds another model's weights: {what}")
        return state
