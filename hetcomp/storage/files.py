"""Files: atomic writes, output folders swapped in as one unit, content hashes.

- ``write_atomic``: a file is written to a temporary name in its folder, flushed, then renamed over the
  target; a crash leaves the old file or the new one, never half of one. Modes follow the umask (as
  ``open`` would), not ``mkstemp``'s 0600.
- ``replace_directory``: an output folder (manifest, weights, ONNX, plots) is built as a hidden sibling and
  swapped in with one ``renameat2(RENAME_EXCHANGE)`` where the kernel has it (Linux >= 3.15), else with two
  renames; a reader sees the old folder or the new one, never a mix, and no file of the old output survives.
  Leftovers of a killed writer (hidden ``.NAME.tmp-*``/``.NAME.old-*`` siblings) are removed by the next save.
- ``sha256_*``: content hashes recorded in manifests and checkpoints and verified when read back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from hetcomp.errors import ConfigError

_RENAME_EXCHANGE = 2  # linux/fs.h


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write ``content`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def sha256_bytes(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False only where the kernel or libc lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, f"cannot swap {a} and {b}: {os.strerror(error)}")


MARKER = ".hetcomp-output"  # the entries a save wrote: what a later save may replace


def _leftovers(directory: Path) -> Iterable[Path]:
    name = glob.escape(directory.name)
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        yield from directory.parent.glob(pattern)


def _owned(directory: Path) -> bool:
    """A folder is ours to replace only if a save made it and nobody added anything since: its marker lists
    every entry in it."""
    try:
        listed = set(json.loads((directory / MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return {entry.name for entry in directory.iterdir()} <= listed | {MARKER}


def add_outputs(directory: Path, names: Iterable[str]) -> None:
    """Record files written into a saved output folder after the save (e.g. plots ``hetcomp report`` adds), so
    the next save may still replace the folder. A folder without a marker (not a save's) is left as it is."""
    marker = Path(directory) / MARKER
    try:
        listed = set(json.loads(marker.read_text()))
    except (OSError, ValueError, TypeError):
        return
    write_atomic(marker, json.dumps(sorted(listed | set(names))))


def replace_directory(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a new ``directory`` with ``write(tmp)`` and swap it in as one unit.

    An existing non-empty folder is replaced only if an earlier save made it and it holds nothing else (its
    ``.hetcomp-output`` marker lists every entry): a mistyped path, the current folder, or an output folder
    someone added files to is refused, never deleted. A symlink is followed: the folder it points to is
    replaced, the link stays.
    """
    directory = Path(directory).resolve()
    if directory == Path.cwd().resolve() or directory in Path.cwd().resolve().parents:
        raise ConfigError(f"{directory} is the current folder or holds it; choose a new output folder")
    if directory.exists():
        if not directory.is_dir():
            raise ConfigError(f"{directory} exists and is not a folder; choose another output folder")
        if any(directory.iterdir()) and not _owned(directory):
            raise ConfigError(f"{directory} is not empty and is not (only) an earlier hetcomp output; choose a new "
                              "or empty folder (hetcomp replaces its output folder as a whole)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(directory):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        write_atomic(tmp / MARKER, json.dumps(sorted(entry.name for entry in tmp.iterdir())))
        _fsync_tree(tmp)
        if directory.exists():
            if _exchange(tmp, directory):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output; the swap is done
            else:
                old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
                os.replace(directory, old / "content")
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory.parent)
    return directory


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(folder))
