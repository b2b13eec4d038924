"""Helpers of the rehearsal's twins (`iisan.data.kinds`' `twin`, `iisan.pipeline.rehearsal`):
files placed in a mirror under their published names, and the demo's covers in the authors'
archive layout."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from iisan.io import atomic_path

ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # one date for every member: a twin's archives are the same bytes every time


def file_sha256(path: Path) -> str:
    from iisan.data.download import sha256

    return sha256(path)


def place(src: Path, mirror: Path, relpath: str) -> Path:
    """Move file or folder `src` to `relpath` in the mirror, replacing what is there."""
    dest = mirror / relpath
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        shutil.rmtree(dest)
    os.replace(src, dest)
    return dest


def authors_archive(images_zip: Path, dest: Path) -> None:
    """The demo's flat archive of ``<item_id>.jpg`` as the authors publish theirs: the same
    images inside one folder named after the archive (``am_image_is/<item_id>.jpg``)."""
    folder = dest.name.removesuffix(".zip")
    with zipfile.ZipFile(images_zip) as src, atomic_path(dest, ".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as out:
            for member in src.infolist():
                out.writestr(zipfile.ZipInfo(f"{folder}/{Path(member.filename).name}", date_time=ZIP_TIME), src.read(member))
