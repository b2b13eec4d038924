"""Files the workflow writes and reads back.

Writing: atomically (a temporary file beside the target, renamed onto it), with the mode a plain
``open(path, "w")`` gives (0666 minus the umask).

Reading back: a file that fails to read or parse is damaged; `read_or_set_aside` moves it aside
as ``<name>.damaged-<UTC time>`` (nothing is deleted) and raises `DamagedFileError`, whose
message names the path, the failure, the new name and what happens next. The file is then
missing, so the workflow's next run makes it again (Snakemake reruns a job whose output is
missing) instead of failing on it every time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# failures that say nothing about the file's content: never a reason to move it aside
NOT_DAMAGE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, MemoryError)


class DamagedFileError(ValueError):
    """A file that could not be read or parsed; it has been moved aside (the message says where
    and what happens next)."""


class DiskFullError(OSError):
    """Too little free space for a file about to be written (the message names the file, the
    bytes needed and the bytes free)."""


def current_umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode() -> int:
    """The mode of a file a plain ``open(path, "w")`` creates: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def honour_umask(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the mode `output_mode` (libraries that write through
    temporary files, e.g. safetensors, leave 0600)."""
    mode = output_mode()
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto `path` on success.

    On an exception the temporary file is removed and an existing `path` is left untouched.
    The result gets the mode a plain ``open(path, "w")`` would give (0666 minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, output_mode())  # mkstemp creates 0600; outputs honour the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def require_free_space(path: str | os.PathLike, needed: int) -> None:
    """Stop with `DiskFullError` unless the filesystem that will hold `path` has `needed` bytes
    free (a memory-mapped write that runs out of space kills the process with SIGBUS instead)."""
    path = Path(path)
    folder = next(p for p in (path.parent, *path.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DiskFullError(f"{path}: needs {needed} bytes ({needed / 2**30:.2f} GiB), but its filesystem has only "
                            f"{free} bytes ({free / 2**30:.2f} GiB) free; free some space and rerun")


def set_aside(path: str | os.PathLike, reason: str) -> Path:
    """Rename a damaged file or folder to ``<name>.damaged-<UTC time>`` beside it (nothing is
    deleted; a second one in the same second gets ``.1``, ``.2``, ...) and log why."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 0
    while dst.exists() or dst.is_symlink():
        n += 1
        dst = path.with_name(f"{path.name}.damaged-{stamp}.{n}")
    os.replace(path, dst)
    log.warning("%s: %s; moved aside to %s", path, reason, dst.name)
    return dst


def read_or_set_aside(path: str | os.PathLike, read: Callable[[Path], T], then: str, *,
                      errors: tuple[type[BaseException], ...] = (Exception,), move: str | os.PathLike | None = None) -> T:
    """``read(path)``; if it fails with one of `errors` (other than `NOT_DAMAGE`), move `move`
    (default: `path`; e.g. the folder a file belongs to) aside and raise `DamagedFileError`
    naming `path`, the failure and the new name, followed by `then` (what happens next, e.g.
    "the next run of the workflow makes it again")."""
    path = Path(path)
    try:
        return read(path)
    except NOT_DAMAGE:
        raise
    except errors as err:
        what = f"{type(err).__name__}: {err}"
        target = Path(move) if move is not None else path
        dst = set_aside(target, f"{path.name}: {what}" if target != path else what)
        raise DamagedFileError(f"{path}: unreadable ({what}); moved aside to {dst}; {then}") from err


def check_model_folder(folder: str | os.PathLike, then: str) -> None:
    """Parse every weights file (``*.safetensors``: its header, and that the file holds every
    tensor the header lists) and JSON file (config, tokenizer, processor) of a saved model folder;
    a damaged one moves the whole folder aside (`read_or_set_aside`, `then` says what happens
    next). Reads headers only: milliseconds."""
    folder = Path(folder)
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        read_or_set_aside(f, _parse_model_file, then, move=folder)


def _parse_model_file(path: Path) -> None:
    if path.suffix == ".json":
        _parse_json(path)
        return
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as fh:  # checks the header against the file's size
        fh.keys()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, *, then: str | None = None) -> Any:
    """A JSON file's content. With `then` (what happens next), a file that is not valid JSON is
    moved aside (`read_or_set_aside`); without, it raises a ValueError naming the path."""
    path = Path(path)
    if then is not None:
        return read_or_set_aside(path, _parse_json, then, errors=(ValueError,))
    try:
        return _parse_json(path)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _parse_json(path: Path) -> Any:
    return json.loads(path.read_text())  # UnicodeDecodeError and JSONDecodeError are ValueErrors


def write_parquet(df, path: str | os.PathLike) -> None:
    with atomic_path(path, ".parquet") as tmp:
        df.write_parquet(tmp)
