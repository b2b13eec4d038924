"""Files the workflow writes and reads back.

Writing: atomically (a temporary file beside the target, renamed onto it), with the mode a plain
``open(path, "w")`` gives (0666 minus the umask).

Reading back: a file that fails to read or parse is damaged; `read_or_set_aside` moves it aside
as ``<name>.damaged-<UTC time>`` (nothing is deleted) and raises `DamagedFileError`, whose
message names the path, the failure, the new name and what happens next. The file is then
missing, so the workflow's next run makes it again (Snakemake reruns a job whose output is
missing) instead of failing on it every time.

A full disk: a write through `atomic_path` (every writer here: `write_json`, `write_parquet`, and
the library's other outputs) that fails for lack of space raises `DiskFullError` naming the file
instead of the bare ``No space left on device (os error 28)`` of the writing library, as does
`require_free_space` before a large write; both list the ``.damaged-*`` copies of the file beside
it, which may be what filled the disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from iisan.errors import NamedError, is_named

log = logging.getLogger(__name__)
T = TypeVar("T")

# failures that say nothing about the file's content: never a reason to move it aside
NOT_DAMAGE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, MemoryError)


class DamagedFileError(NamedError, ValueError):
    """A file that could not be read or parsed; it has been moved aside (the message says where
    and what happens next)."""


class DiskFullError(NamedError, OSError):
    """Too little free space for a file about to be written, or a write that ran out of it (the
    message names the file, the space, and the file's ``.damaged-*`` copies beside it; `errno` is
    ENOSPC or EDQUOT)."""


# why a write failed for lack of space, by errno; the writing libraries' messages carry the
# errno's text and, from Rust (polars), "(os error N)"
DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
NEARLY_FULL = 2**20  # bytes free below which a write failing with an unnamed error (torch.save's) is taken for a full disk


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

    On an exception the temporary file is removed and an existing `path` is left untouched; one
    that says the disk is full (or the quota exceeded) becomes `DiskFullError` naming `path`
    (`disk_full_error`). The result gets the mode a plain ``open(path, "w")`` would give (0666
    minus the umask).
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
    except BaseException as err:
        code = _disk_full(err, path.parent) if isinstance(err, Exception) and not is_named(err) else None
        tmp.unlink(missing_ok=True)
        if code is None:
            raise
        detail = f"{type(err).__name__}: {err}"
        try:
            free = f"; its filesystem has {size_text(shutil.disk_usage(path.parent).free)} free now"
        except OSError:
            free = ""
        raise disk_full_error(path, f"cannot write it: {DISK_FULL[code]} ({detail[:300]}){free}", code) from err


def _disk_full(err: BaseException, folder: Path) -> int | None:
    """ENOSPC or EDQUOT when `err` (or an exception it was raised from) says the write ran out of
    space; ENOSPC when it says nothing of the kind but `folder`'s filesystem has less than
    `NEARLY_FULL` bytes free (torch.save's "unexpected pos" error); else None."""
    seen = err
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return seen.errno
        text = str(seen)
        for code in DISK_FULL:
            if f"(os error {code})" in text or os.strerror(code) in text:
                return code
        seen = seen.__cause__ or seen.__context__
    try:
        return errno.ENOSPC if shutil.disk_usage(folder).free < NEARLY_FULL else None
    except OSError:
        return None


def size_text(n: int) -> str:
    """A number of bytes for people: `812 bytes`, `3.4 MiB`, `1.50 GiB`."""
    if n < 2**10:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


def damaged_copies(path: str | os.PathLike) -> list[tuple[Path, int]]:
    """The copies of `path` that `set_aside` moved aside beside it (``<name>.damaged-*``; for
    ``<name>.partial``, being written, those of ``<name>``), oldest first, with their sizes in
    bytes (a folder's: the files in it)."""
    path = Path(path)
    names = {path.name, path.name.removesuffix(".partial")}
    out = []
    try:
        entries = sorted(path.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if not any(p.name.startswith(f"{n}.damaged-") for n in names):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                size = sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
            else:
                size = p.lstat().st_size
        except OSError:
            continue
        out.append((p, size))
    return out


def disk_full_error(path: str | os.PathLike, what: str, code: int = errno.ENOSPC) -> DiskFullError:
    """`DiskFullError`: ``<path>: <what>``, the damaged copies of `path` beside it (they may be
    what filled the disk) with their sizes, and what to do."""
    path = Path(path)
    copies = damaged_copies(path)
    text = f"{path}: {what}"
    if copies:
        one = len(copies) == 1
        listed = ", ".join(f"{p.name} ({size_text(size)})" for p, size in copies[:10])
        more = f" and {len(copies) - 10} more" if len(copies) > 10 else ""
        total = sum(size for _, size in copies)
        text += (f". Beside it, {'a damaged copy' if one else f'{len(copies)} damaged copies'} of it moved aside earlier "
                 f"{'takes' if one else 'take'} {size_text(total)} and may be what filled the disk: {listed}{more}. "
                 f"Delete {'it if you no longer need it' if one else 'those you no longer need'}, or free other space, "
                 "and rerun")
    else:
        text += "; free some space and rerun"
    err = DiskFullError(text)
    err.errno = code
    return err


def require_free_space(path: str | os.PathLike, needed: int) -> None:
    """Stop with `DiskFullError` unless the filesystem that will hold `path` has `needed` bytes
    free (a memory-mapped write that runs out of space kills the process with SIGBUS instead)."""
    path = Path(path)
    folder = next(p for p in (path.parent, *path.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise disk_full_error(path, f"needs {needed} bytes ({needed / 2**30:.2f} GiB), but its filesystem has only "
                                    f"{free} bytes ({free / 2**30:.2f} GiB) free")


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
