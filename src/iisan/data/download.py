"""Fetching the authors' published files (or copying them from a local mirror): the TSV files,
and the Amazon datasets' image archives (`fetch_images`)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from iisan.io import atomic_path

log = logging.getLogger(__name__)


# Some hosts (the MicroLens site) refuse Python's default user agent
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


class ChecksumError(ValueError):
    pass


class MissingSource(FileNotFoundError):
    """A raw file that is neither in the mirror nor downloadable; the message says how to supply it."""


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


def is_google_drive(url: str) -> bool:
    return urllib.parse.urlparse(url).hostname in ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")


def download(url: str, dest: Path) -> None:
    """Download `url` to `dest`: Google Drive links (a share link ``.../file/d/<id>/view`` or
    ``uc?id=<id>``) through gdown, which passes Drive's confirmation page for large files; any
    other address with urllib."""
    log.info("downloading %s", url)
    if is_google_drive(url):
        try:
            import gdown
        except ImportError as err:
            raise RuntimeError(f"{url} is a Google Drive link: downloading it needs gdown (pip install gdown)") from err
        gdown.download(url, str(dest), quiet=True, fuzzy=True)
        return
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=120) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out)


def fetch(relpath: str, dest: Path, *, base_url: str | None = None, mirror: str | None = None, expected_sha256: str | None = None,
          url: str | None = None, check=None) -> str:
    """Copy `mirror/relpath` (when a mirror is given) or download `url` (else `base_url/relpath`)
    to `dest`, verifying the sha256 when one is known and calling `check(path, origin)` on the
    file before it replaces `dest`. Returns the file's sha256."""
    dest = Path(dest)
    with atomic_path(dest, ".part") as tmp:
        if mirror:
            src = Path(mirror) / relpath
            if not src.is_file():
                raise FileNotFoundError(f"mirror {mirror}: no file {relpath} (expected {src})")
            shutil.copyfile(src, tmp)
            origin = str(src)
        else:
            origin = url or f"{base_url.rstrip('/')}/{relpath}"
            download(origin, tmp)
        if check is not None:
            check(tmp, origin)
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


def _check_zip(path: Path, origin: str) -> None:
    if not zipfile.is_zipfile(path):
        head = path.read_bytes()[:200].decode("utf-8", "replace").strip().splitlines()[:1]
        raise ValueError(f"{origin}: not a zip archive (it starts with {head[0][:80] if head else 'nothing'!r}: "
                         "a web page instead of the file, e.g. a download quota or permission page)")


def pack_folder(folder: Path, dest: Path) -> str:
    """Store every file below `folder` (an unpacked image archive) in the zip archive `dest`,
    with paths relative to the folder's parent (``am_image_is/<item_id>.jpg``); returns its sha256."""
    folder = Path(folder)
    with atomic_path(Path(dest), ".part") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                zf.write(f, f.relative_to(folder.parent).as_posix())
        digest = sha256(tmp)
    log.info("packed %s into %s", folder, dest)
    return digest


def fetch_images(dataset: str, source: dict, dest: Path, *, mirror: str | None = None) -> str:
    """An Amazon dataset's image archive (config key ``dataset_sources.<dataset>.images``:
    `file`, its name below the mirror; `url`, where the authors publish it; `sha256`) into
    `dest`: the mirror's ``<mirror>/<file>`` when there is one, else its unpacked folder
    ``<mirror>/<file without .zip>/`` packed into a zip, else downloaded from `url`. Returns the
    archive's sha256; with none of the three, or a failed download, stops with `MissingSource`,
    which says where to place the archive by hand."""
    file, url, expected = source.get("file"), source.get("url"), source.get("sha256")
    how = (f"Download {file or 'the archive'} by hand ({url or 'no url in the config'}) and place it at {Path(dest).resolve()}"
           f"{f' or in the mirror as {Path(mirror) / file}' if mirror and file else ''}; the workflow then uses it as it is.")
    if mirror and file:
        if (Path(mirror) / file).is_file():
            return fetch(file, dest, mirror=mirror, expected_sha256=expected, check=_check_zip)
        unpacked = Path(mirror) / Path(file).with_suffix("")
        if unpacked.is_dir():
            return pack_folder(unpacked, dest)
    if not url:
        where = f"neither {Path(mirror) / file} nor its unpacked folder exist, and " if mirror and file else ""
        raise MissingSource(f"dataset {dataset}: no image archive: {where}dataset_sources.{dataset}.images has no url. {how}")
    try:
        return fetch(file or Path(dest).name, dest, url=url, expected_sha256=expected, check=_check_zip)
    except ChecksumError:
        raise
    except Exception as err:
        raise MissingSource(f"dataset {dataset}: downloading its image archive from {url} failed ({err}). {how}") from err
