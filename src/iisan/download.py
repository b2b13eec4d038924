"""Fetching the authors' published TSV files (or copying them from a local mirror)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.request
from pathlib import Path

from .io import atomic_path

log = logging.getLogger(__name__)


# Some hosts (the MicroLens site) refuse Python's default user agent
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


class ChecksumError(ValueError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_many(relpaths: list[str], dest_dir: Path, *, base_url: str, mirror: str | None = None) -> dict:
    """Fetch every file of `relpaths` into `dest_dir` under its own name, skipping those already
    there (each file is written atomically, so one that exists is complete): an interrupted run
    resumes where it stopped. Returns {name: sha256 or None for files already present}."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for rel in relpaths:
        dest = dest_dir / Path(rel).name
        out[dest.name] = None if dest.exists() else fetch(rel, dest, base_url=base_url, mirror=mirror)
    return out


def fetch(relpath: str, dest: Path, *, base_url: str, mirror: str | None = None, expected_sha256: str | None = None) -> str:
    """Copy `mirror/relpath` (when a mirror is given) or download `base_url/relpath` to `dest`,
    verifying the sha256 when one is known. Returns the file's sha256."""
    dest = Path(dest)
    with atomic_path(dest, ".part") as tmp:
        if mirror:
            src = Path(mirror) / relpath
            if not src.is_file():
                raise FileNotFoundError(f"mirror {mirror}: no file {relpath} (expected {src})")
            shutil.copyfile(src, tmp)
            origin = str(src)
        else:
            url = f"{base_url.rstrip('/')}/{relpath}"
            log.info("downloading %s", url)
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=120) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
            origin = url
        digest = sha256(tmp)
        if expected_sha256:
            if digest != expected_sha256:
                raise ChecksumError(
                    f"{origin}: sha256 is {digest}, the config expects {expected_sha256}; "
                    "the file is corrupt or a different version"
                )
        else:
            log.warning("%s: no sha256 in the config to verify against (got %s)", origin, digest)
    return digest
