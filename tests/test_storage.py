"""hetcomp.storage: atomic files, output folders swapped in whole, the run key and the step log (constructed cases)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from hetcomp.errors import CheckpointError, ConfigError
from hetcomp.storage import StepLog, replace_directory, run_key, sha256_bytes, sha256_file, step_file, write_atomic

KEY = run_key({"method": "test", "settings": {"lr": 0.1}})


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), value), "b": torch.arange(4)}


def finished_log(root, key: str = KEY) -> StepLog:
    """Three steps: tensors, none, tensors."""
    log = StepLog(root, key, "test")
    assert log.resume() == []
    log.append({"step": 0, "loss": 1.5}, tensors(1.0))
    log.append({"step": 1, "moved": {"a->b": 2}})
    log.append({"step": 2, "counts": np.array([[1, 2], [3, 4]])}, tensors(3.0))
    return log


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the run key --------------------------------------------------------------------------------------------

def test_run_key_hashes_the_description():
    assert len(KEY) == 16 and KEY == run_key({"settings": {"lr": 0.1}, "method": "test"})  # key order is irrelevant
    assert run_key({"method": "test", "settings": {"lr": 0.2}}) != KEY
    assert run_key({"counts": np.array([1, 2])}) == run_key({"counts": [1, 2]})  # numpy values as lists


# -- the step log -------------------------------------------------------------------------------------------

def test_step_log_round_trip(tmp_path):
    finished_log(tmp_path)
    directory = tmp_path / KEY
    progress = json.loads((directory / "progress.json").read_text())
    assert progress["run_key"] == KEY and progress["method"] == "test"
    assert [step["tensors"] is None for step in progress["steps"]] == [False, True, False]
    for index in (0, 2):
        entry = progress["steps"][index]["tensors"]
        assert entry["file"] == step_file(index)
        assert entry["sha256"] == sha256_file(directory / entry["file"])
        assert entry["bytes"] == (directory / entry["file"]).stat().st_size
    assert sorted(p.name for p in directory.iterdir()) == ["progress.json", step_file(0), step_file(2)]

    resumed = StepLog(tmp_path, KEY, "test")
    assert resumed.resume() == [{"step": 0, "loss": 1.5}, {"step": 1, "moved": {"a->b": 2}},
                                {"step": 2, "counts": [[1, 2], [3, 4]]}]
    assert equal(resumed.tensors(0, expected=tensors(0.0)), tensors(1.0))
    assert equal(resumed.latest_tensors(), tensors(3.0))
    with pytest.raises(CheckpointError, match=r"step-01\.safetensors is corrupted \(not listed"):
        resumed.tensors(1)
    resumed.append({"step": 3})  # appends after the resumed steps
    assert [r["step"] for r in StepLog(tmp_path, KEY, "test").resume()] == [0, 1, 2, 3]


def test_a_changed_run_key_starts_over_and_leaves_the_other_run_alone(tmp_path):
    finished_log(tmp_path)
    other = StepLog(tmp_path, run_key({"method": "test", "settings": {"lr": 0.2}}), "test")
    assert other.resume() == [] and other.latest_tensors() is None
    other.append({"step": 0}, tensors(9.0))
    assert len(StepLog(tmp_path, KEY, "test").resume()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([KEY, other.key])
    # a run folder whose progress.json names another run key is refused, not resumed
    shutil.copyfile(tmp_path / other.key / "progress.json", tmp_path / KEY / "progress.json")
    with pytest.raises(CheckpointError, match=rf"progress\.json is corrupted \(format 3 and run key '{other.key}', "
                                              rf"expected format 3 and run key '{KEY}'\)"):
        StepLog(tmp_path, KEY, "test").resume()


def test_restart_forgets_the_steps_on_disk(tmp_path):
    finished_log(tmp_path)
    log = StepLog(tmp_path, KEY, "test")
    assert log.restart() == []
    assert [p.name for p in (tmp_path / KEY).iterdir()] == ["progress.json"]
    assert StepLog(tmp_path, KEY, "test").resume() == []
    log.append({"step": 0}, tensors(5.0))
    resumed = StepLog(tmp_path, KEY, "test")
    assert resumed.resume() == [{"step": 0}] and equal(resumed.latest_tensors(), tensors(5.0))


def test_a_kill_between_the_tensor_file_and_progress_loses_only_that_step(tmp_path, monkeypatch):
    log = finished_log(tmp_path)
    import hetcomp.storage.checkpoints as checkpoints

    real = checkpoints.write_atomic

    def killed_on_progress(path, content):
        if path.name == "progress.json":
            raise KeyboardInterrupt("killed")
        return real(path, content)

    monkeypatch.setattr(checkpoints, "write_atomic", killed_on_progress)
    with pytest.raises(KeyboardInterrupt):
        log.append({"step": 3}, tensors(4.0))
    monkeypatch.undo()
    resumed = StepLog(tmp_path, KEY, "test")
    assert len(resumed.resume()) == 3 and equal(resumed.latest_tensors(), tensors(3.0))


def test_no_root_keeps_nothing(tmp_path):
    log = StepLog(None, KEY, "test")
    assert log.resume() == [] and log.directory is None
    log.append({"step": 0}, tensors(1.0))
    assert log.latest_tensors() is None and not any(tmp_path.iterdir())


def _truncate(directory):
    path = directory / "step-02.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def _replace(directory):  # same size, other content: only the checksum tells
    shutil.copyfile(directory / "step-00.safetensors", directory / "step-02.safetensors")


def _delete(directory):
    (directory / "step-00.safetensors").unlink()


def _rewrite_progress(text):
    return lambda directory: (directory / "progress.json").write_text(text)


def _bad_entry(directory):
    progress = json.loads((directory / "progress.json").read_text())
    progress["steps"][2]["tensors"]["file"] = "../elsewhere.safetensors"
    (directory / "progress.json").write_text(json.dumps(progress))


CORRUPTIONS = [
    ("truncated", _truncate, r"step-02\.safetensors is corrupted \(\d+ bytes, progress\.json recorded \d+: truncated"),
    ("replaced", _replace, r"step-02\.safetensors is corrupted \(its SHA-256 does not match progress\.json"),
    ("missing", _delete, r"step-00\.safetensors is corrupted \(missing, but progress\.json lists it\)"),
    ("not JSON", _rewrite_progress('{"format": 3, "run_key": '), r"progress\.json is corrupted \(not readable JSON"),
    ("a JSON list", _rewrite_progress("[]"), r"progress\.json is corrupted \(a JSON list, not an object\)"),
    ("steps not a list", _rewrite_progress(json.dumps({"format": 3, "run_key": KEY, "steps": {}})),
     r"progress\.json is corrupted \('steps' must be a list"),
    ("a step without a record", _rewrite_progress(json.dumps({"format": 3, "run_key": KEY, "steps": [{}]})),
     r"progress\.json is corrupted \(step 0 is not"),
    ("a file entry naming another file", _bad_entry, r"progress\.json is corrupted \(step 2's 'tensors' is not"),
]


@pytest.mark.parametrize("corrupt, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupted_run_is_refused_with_the_file_and_the_fix(tmp_path, corrupt, message):
    finished_log(tmp_path)
    corrupt(tmp_path / KEY)
    with pytest.raises(CheckpointError, match=message) as raised:
        StepLog(tmp_path, KEY, "test").resume()
    assert str(raised.value).startswith(f"test checkpoint {tmp_path / KEY}")
    assert str(raised.value).endswith(f"resume with resume=False or delete {tmp_path / KEY}")


def test_a_loaded_tensor_file_is_checked_again(tmp_path):
    finished_log(tmp_path)
    log = StepLog(tmp_path, KEY, "test")
    log.resume()
    with pytest.raises(CheckpointError, match=r"step-02\.safetensors is corrupted \(it holds another model's weights: "
                                              r"missing \['v'\]; unexpected \['b'\]; other shapes for \['w'\]\)"):
        log.latest_tensors(expected={"w": torch.zeros(2, 3), "v": torch.zeros(1)})
    _replace(tmp_path / KEY)  # replaced after resume() verified it: the bytes read are checked again
    with pytest.raises(CheckpointError, match=r"step-02\.safetensors is corrupted \(its SHA-256"):
        log.latest_tensors()


def test_the_fix_names_only_deleting_where_there_is_no_resume_setting(tmp_path):
    finished_log(tmp_path)
    _truncate(tmp_path / KEY)
    with pytest.raises(CheckpointError, match=rf"; delete {tmp_path / KEY} to start over$"):
        StepLog(tmp_path, KEY, "row remap", restart_with=None).resume()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"row remap checkpoint folder .*file is a file; pass a folder"):
        StepLog(tmp_path / "file", KEY, "row remap", restart_with=None)


# -- files --------------------------------------------------------------------------------------------------

def test_write_atomic_replaces_whole_and_leaves_no_temporary_file_on_error(tmp_path, monkeypatch):
    path = tmp_path / "out" / "data.json"
    write_atomic(path, "old")
    assert path.read_text() == "old" and sha256_file(path) == sha256_bytes(b"old")
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the umask's mode, not mkstemp's 0600

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    with pytest.raises(TypeError):
        write_atomic(path, ["neither str nor bytes"])
    assert path.read_text() == "old" and os.listdir(path.parent) == ["data.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_replace_directory_swaps_in_whole_and_refuses_a_foreign_folder(tmp_path, monkeypatch):
    def output(files):
        def write(folder):
            for name, text in files.items():
                (folder / name).write_text(text)
        return write

    target = tmp_path / "out"
    replace_directory(target, output({"manifest.json": "1", "old.txt": "x"}))
    replace_directory(target, output({"manifest.json": "2"}))
    assert sorted(os.listdir(target)) == [".hetcomp-output", "manifest.json"]
    assert (target / "manifest.json").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no hidden temporary or old folder left

    foreign = tmp_path / "webapp"  # a folder with a manifest.json that is not hetcomp's
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my-web-app"}')
    (foreign / "app.js").write_text("precious")
    with pytest.raises(ConfigError, match=r"webapp is not empty and is not \(only\) an earlier hetcomp output"):
        replace_directory(foreign, output({"manifest.json": "3"}))
    assert sorted(os.listdir(foreign)) == ["app.js", "manifest.json"]

    (target / "curvature.png").write_text("added by the user after the save")
    with pytest.raises(ConfigError, match="not \\(only\\) an earlier hetcomp output"):
        replace_directory(target, output({"manifest.json": "4"}))
    assert (target / "curvature.png").exists()
    (target / "curvature.png").unlink()

    monkeypatch.chdir(target)
    with pytest.raises(ConfigError, match="current folder"):
        replace_directory(".", output({"manifest.json": "5"}))
    with pytest.raises(ConfigError, match="current folder"):
        replace_directory(tmp_path, output({"manifest.json": "5"}))
    monkeypatch.chdir(tmp_path)

    link = tmp_path / "latest"
    link.symlink_to(target)
    replace_directory(link, output({"manifest.json": "6"}))  # the folder the link points to is replaced
    assert link.is_symlink() and (target / "manifest.json").read_text() == "6"

    bracketed = tmp_path / "out[1]"
    replace_directory(bracketed, output({"manifest.json": "7"}))  # glob characters in the name are literal
    assert (bracketed / "manifest.json").read_text() == "7"

    def failing(folder):
        (folder / "manifest.json").write_text("half")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        replace_directory(target, failing)
    assert (target / "manifest.json").read_text() == "6"
    assert sorted(os.listdir(tmp_path)) == ["latest", "out", "out[1]", "webapp"]


def test_run_keys_tell_user_functions_apart():
    import functools

    import torch.nn as nn
    import torch.nn.functional as F

    from hetcomp.storage.checkpoints import describe_callable

    def make(weight):
        return lambda logits, labels: weight * F.cross_entropy(logits, labels)

    described = [describe_callable(fn) for fn in (
        nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.3), make(1.0), make(2.0),
        functools.partial(F.cross_entropy, label_smoothing=0.1),
        functools.partial(F.cross_entropy, label_smoothing=0.2),
        F.cross_entropy, None)]
    assert len(set(described)) == len(described)
    assert describe_callable(make(1.0)) == describe_callable(make(1.0))  # the same function: the same key
