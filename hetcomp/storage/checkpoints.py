"""Resumable runs: the run key and the step log shared by LAFT, the mac-greedy search and row remap.

A run keeps ``<root>/<run key>/progress.json`` and, for the steps that carry tensors,
``step-NN.safetensors`` (plain tensors, no pickle). progress.json holds the format, the method, the run
key and, per finished step, its JSON record and its tensor file's name, size and SHA-256 (or null: a step
without tensors, e.g. a row-remap move or a rejected mac-greedy candidate). Each file is written
atomically (``write_atomic``), a step's tensor file before the progress.json that lists it, so a kill at
any moment leaves exactly the steps finished before it.

The run key hashes a JSON description of everything a step's result depends on (model fingerprint,
targets, seed, settings, hashes of the data, ...), plus hetcomp's version and this format. The same
behaviour for all three searches follows from keying the folder: the same run resumes after its last
finished step (and so reaches the result of an uninterrupted run); a run whose key changed (other
weights, data, settings or hetcomp version) gets a folder of its own and starts from its first step. The
folders of other runs are left alone (delete them to reclaim the space).

Resume verifies before anything is used: progress.json must parse, have this format and run key, and
list well-formed steps; every listed tensor file must be present with the recorded size and SHA-256; a
tensor file that is loaded must parse, hold finite tensors and (when given) the expected names and
shapes. Anything else raises ``CheckpointError`` naming the file and the fix ("resume with resume=False or
delete DIR"), never a silent load or a silent restart.

Under torch.distributed (torchrun) every rank keeps the same log: rank 0 alone writes (``restart`` and
``append``; the others wait for it and take its file entry, or its error), every rank reads and verifies on
resume (the folder must be one every rank sees: a shared filesystem across nodes). The ranks then compare
what they read: if any rank failed, or they read different steps (a node-local folder), every rank raises
the same CheckpointError, so no rank goes on alone.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetcomp import distributed
from hetcomp.errors import CheckpointError, ConfigError
from hetcomp.storage.files import sha256_bytes, sha256_file, write_atomic

FORMAT = 3  # 1: stage-NN.pt (torch.save); 2: stage-NN.safetensors, LAFT/mac-greedy only; 3: steps, all searches
PROGRESS = "progress.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic | torch.Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def run_key(description: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``description`` (JSON with sorted keys; numpy values and tensors as
    lists, anything else not JSON-able as ``str``), hetcomp's version and the checkpoint format. Hash large
    tensors first (``hetcomp.manifest.data_hash``) and put the hash in the description."""
    from hetcomp import __version__

    text = json.dumps({**description, "hetcomp_version": __version__, "checkpoint_format": FORMAT},
                      sort_keys=True, default=_jsonable)
    return sha256_bytes(text.encode())[:16]


def describe_callable(fn: Any) -> str:
    """What a run key records of a user function (a loss, a quality measure), so that two different ones never
    share a key: an ``nn.Module``'s class, repr and plain attributes (``CrossEntropyLoss(label_smoothing=0.3)``
    reprs like the default one), a ``functools.partial``'s function and arguments, a function's module,
    qualified name, code, defaults and closure values, another callable object's class and ``__call__`` code."""
    if fn is None:
        return "None"
    if isinstance(fn, functools.partial):
        return f"partial({describe_callable(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    if isinstance(fn, torch.nn.Module):
        plain = {k: v for k, v in sorted(vars(fn).items()) if isinstance(v, int | float | str | bool | type(None))}
        return f"{type(fn).__module__}.{type(fn).__qualname__} {fn!r} {plain!r}"
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: its class and its __call__ (its state, e.g. a call counter, is not keyed)
        call = getattr(type(fn).__call__, "__code__", None)
        return f"{type(fn).__module__}.{type(fn).__qualname__} call={sha256_bytes(call.co_code)[:16] if call else ''}"
    closure = [cell.cell_contents for cell in fn.__closure__ or ()]
    return (f"{fn.__module__}.{fn.__qualname__} defaults={fn.__defaults__!r} closure={closure!r} "
            f"code={sha256_bytes(code.co_code)[:16]}")


def step_file(index: int) -> str:
    return f"step-{index:02d}.safetensors"


class StepLog:
    """The finished steps of one run, kept in ``<root>/<key>/``; ``root=None`` keeps nothing on disk.

    Call ``resume()`` (the verified records of the steps finished before) or ``restart()`` (start from the
    first step) once, then ``append(record, tensors)`` after each step; ``latest_tensors()`` gives the
    tensors of the last step that has some. ``method`` names the run in errors ("LAFT", "mac-greedy",
    "row remap"); ``restart_with`` is how the caller's user starts over instead of resuming
    (``"resume=False"``; None where only deleting the folder does).
    """

    def __init__(self, root: str | os.PathLike | None, key: str, method: str,
                 restart_with: str | None = "resume=False") -> None:
        if root is not None and Path(root).exists() and not Path(root).is_dir():
            raise ConfigError(f"{method} checkpoint folder {root} is a file; pass a folder (each run keeps its "
                              "steps in <folder>/<run key>/)")
        keys = distributed.all_agree(key)  # one process: [key]
        if len(set(keys)) > 1:
            raise ConfigError(f"the torch.distributed ranks describe different {method} runs (run keys {keys}): "
                              "every rank must pass the same model, data, targets and settings (hetcomp shards "
                              "the work itself)")
        self.key, self.method, self.restart_with = key, method, restart_with
        self.directory = None if root is None else Path(root) / key
        self._steps: list[dict[str, Any]] | None = None  # per finished step: {"record": ..., "tensors": ...}

    def corrupted(self, name: str, why: str) -> CheckpointError:
        """The error for an unusable file of this run (also for callers that find a record they cannot use)."""
        fix = (f"resume with {self.restart_with} or delete {self.directory}" if self.restart_with
               else f"delete {self.directory} to start over")
        return CheckpointError(f"{self.method} checkpoint {self.directory / name} is corrupted ({why}); {fix}")

    # -- reading --------------------------------------------------------------------------------------------
    def resume(self) -> list[dict[str, Any]]:
        """The records of the finished steps, in order, after verifying progress.json and every tensor file
        it lists (CheckpointError if progress.json is malformed or for another run, or a file is missing,
        truncated or replaced). [] for a run not started (or ``root=None``). Under torch.distributed every
        rank reads, and every rank raises if any rank failed or the ranks read different steps."""
        return self._on_every_rank(self._resume, lambda records: _digest(self._steps), PROGRESS)

    def _resume(self) -> list[dict[str, Any]]:
        self._steps = []
        if self.directory is None or not (self.directory / PROGRESS).exists():
            return []
        try:
            progress = json.loads((self.directory / PROGRESS).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self.corrupted(PROGRESS, f"not readable JSON: {error}") from None
        if not isinstance(progress, dict):
            raise self.corrupted(PROGRESS, f"a JSON {type(progress).__name__}, not an object")
        if progress.get("format") != FORMAT or progress.get("run_key") != self.key:
            raise self.corrupted(PROGRESS, f"format {progress.get('format')!r} and run key "
                                 f"{progress.get('run_key')!r}, expected format {FORMAT} and run key {self.key!r}")
        steps = progress.get("steps")
        if not isinstance(steps, list):
            raise self.corrupted(PROGRESS, "'steps' must be a list of one entry per finished step")
        for index, step in enumerate(steps):
            if not (isinstance(step, dict) and isinstance(step.get("record"), dict) and "tensors" in step):
                raise self.corrupted(PROGRESS, f"step {index} is not {{'record': {{...}}, 'tensors': {{...}} or null}}")
            if step["tensors"] is not None:
                self._verify(index, step["tensors"])
        self._steps = steps
        return [step["record"] for step in steps]

    def _verify(self, index: int, entry: Any) -> None:
        name = step_file(index)
        if not (isinstance(entry, dict) and entry.get("file") == name and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise self.corrupted(PROGRESS, f"step {index}'s 'tensors' is not "
                                 f"{{'file': {name!r}, 'bytes': <int>, 'sha256': <hex>}} or null")
        path = self.directory / name
        if not path.is_file():
            raise self.corrupted(name, "missing, but progress.json lists it")
        size = path.stat().st_size
        if size == 0:
            raise self.corrupted(name, "zero-length file")
        if size != entry["bytes"]:
            raise self.corrupted(name, f"{size} bytes, progress.json recorded {entry['bytes']}: truncated or replaced")
        if sha256_file(path) != entry["sha256"]:
            raise self.corrupted(name, "its SHA-256 does not match progress.json: modified or replaced")

    def tensors(self, index: int, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Step ``index``'s tensors, verified: its checksum (again: the bytes read are the bytes checked),
        parseable, finite, and with ``expected``'s names and shapes (e.g. the model's state dict). Every rank
        reads them (and raises if any rank could not)."""
        return self._on_every_rank(lambda: self._tensors(index, expected),
                                   lambda state: self._steps[index]["tensors"]["sha256"], step_file(index))

    def _tensors(self, index: int, expected: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load as safetensors_load

        name = step_file(index)
        steps = self._steps or []
        if index >= len(steps) or steps[index]["tensors"] is None:
            raise self.corrupted(name, "not listed in progress.json")
        try:
            content = (self.directory / name).read_bytes()
        except OSError as error:
            raise self.corrupted(name, f"not readable: {error}") from None
        if sha256_bytes(content) != steps[index]["tensors"]["sha256"]:
            raise self.corrupted(name, "its SHA-256 does not match progress.json: modified or replaced")
        try:
            state = safetensors_load(content)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise self.corrupted(name, f"not a safetensors file: {error}") from None
        for key, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise self.corrupted(name, f"tensor {key!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''}")
        if expected is not None:
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
            if missing or extra or shapes:
                what = "; ".join(part for part in (
                    f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                    f"other shapes for {shapes[:3]}" if shapes else "") if part)
                raise self.corrupted(name, f"it holds another model's weights: {what}")
        return state

    def latest_tensors(self, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """The tensors of the last finished step that has some (verified as ``tensors``), or None."""
        for index in reversed(range(len(self._steps or []))):
            if self._steps[index]["tensors"] is not None:
                return self.tensors(index, expected)
        return None

    # -- writing --------------------------------------------------------------------------------------------
    def restart(self) -> list[dict[str, Any]]:
        """Start from the first step: the run's progress.json is emptied (first, so the folder is consistent at
        every moment) and its step files removed. Returns [] (no finished steps), as ``resume`` would. Rank 0
        alone touches the files (the other ranks wait for it)."""
        self._steps = []
        if self.directory is not None:
            distributed.on_main(self._clear)
        return []

    def _clear(self) -> None:
        if self.directory.is_dir():
            if (self.directory / PROGRESS).exists():
                self._write_progress()
            for stale in self.directory.glob("step-*.safetensors"):
                stale.unlink(missing_ok=True)

    def append(self, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Record the next step: its tensors (if any) to ``step-NN.safetensors``, then progress.json listing
        it. ``record`` must be JSON-able (numpy values are written as lists). A log neither resumed nor
        restarted is restarted first. Under torch.distributed every rank calls it with the same record and
        tensors; rank 0 writes and the others take its file entry when it is done (or raise its error)."""
        if self._steps is None:
            self.restart()
        if self.directory is None:
            self._steps.append({"record": dict(record), "tensors": None})
            return

        def write() -> dict[str, Any] | None:
            entry = None
            if tensors is not None:
                from safetensors.torch import save as safetensors_bytes

                # Clones: safetensors refuses tensors that share storage (tied weights).
                content = safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
                name = step_file(len(self._steps))
                write_atomic(self.directory / name, content)  # the tensors before the progress that lists them
                entry = {"file": name, "bytes": len(content), "sha256": sha256_bytes(content)}
            self._steps.append({"record": dict(record), "tensors": entry})
            try:
                self._write_progress()
            except BaseException:
                self._steps.pop()  # not written: not a finished step
                raise
            return entry

        entry = distributed.on_main(write)
        if not distributed.is_main():
            self._steps.append({"record": dict(record), "tensors": entry})

    def _write_progress(self) -> None:
        write_atomic(self.directory / PROGRESS, json.dumps(
            {"format": FORMAT, "method": self.method, "run_key": self.key, "steps": self._steps},
            indent=1, default=_jsonable))

    # -- torch.distributed ----------------------------------------------------------------------------------
    def _on_every_rank(self, read: Any, summary: Any, name: str) -> Any:
        """``read()`` on every rank; then the ranks compare: a failure on any rank, or another ``summary`` of
        what was read than rank 0's, is a CheckpointError on every rank (the same one), so that no rank goes
        on from a checkpoint its peers did not see. One process: ``read()``."""
        if not distributed.active() or distributed.world_size() == 1:
            return read()
        try:
            result, error = read(), None
        except (CheckpointError, OSError) as failure:
            result, error = None, failure
        seen = distributed.all_agree(("read", summary(result)) if error is None else
                                     ("checkpoint" if isinstance(error, CheckpointError) else "os", str(error)))
        failed = [(rank, status, text) for rank, (status, text) in enumerate(seen) if status != "read"]
        if failed:  # the first failing rank's error, on every rank
            rank, status, text = failed[0]
            if error is not None and str(error) == text and isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(text if status == "checkpoint" else f"rank {rank} could not read {self.method} "
                                  f"checkpoint {self.directory / name}: {text}") from error
        if any(text != seen[0][1] for _, text in seen):
            ranks = [rank for rank, (_, text) in enumerate(seen) if text != seen[0][1]]
            raise CheckpointError(
                f"torch.distributed ranks {ranks} read other {self.method} checkpoints in {self.directory} than "
                "rank 0 (rank 0 alone writes them): put the checkpoint folder on a filesystem every rank sees "
                "(a shared folder across nodes)")
        return result


def _digest(steps: Any) -> str:
    """A short hash of a log's steps (what the ranks compare after resuming)."""
    return sha256_bytes(json.dumps(steps, sort_keys=True, default=_jsonable).encode())[:16]
