"""Folders tracked by content: a content manifest lists each file of a folder (matching a
pattern) with its size and sha256, so that a rule whose input is the manifest reruns when a file is
added, removed or replaced, even in place (Snakemake sees a folder's own modification time only).

The sha256 of a file is computed again only when its size or modification time changed: a stat
cache beside the manifest (``<manifest stem>.stat.json``, not a tracked file) keeps (size,
mtime_ns, sha256) per file. `refresh_manifest` rewrites the manifest only when the content
changed, so a file that is merely touched reruns nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from iisan.io import read_json, write_json

log = logging.getLogger(__name__)


def stat_path(manifest: str | os.PathLike) -> Path:
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + ".stat.json")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_stat(path: Path) -> dict:
    try:
        cache = read_json(path)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def content_manifest(folder: str | os.PathLike, pattern: str, stat_cache: dict | None = None) -> tuple[dict, dict]:
    """(manifest, stat cache) of the files of `folder` matching `pattern` (not recursive): the
    manifest is ``{"pattern", "files": {name: {"bytes", "sha256"}}}``; a file whose size and
    mtime_ns equal its entry in `stat_cache` keeps that entry's sha256 without being read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    stat_cache = stat_cache or {}
    files, stats = {}, {}
    for path in sorted(folder.glob(pattern)):
        if not path.is_file():
            continue
        st = path.stat()
        old = stat_cache.get(path.name)
        if isinstance(old, list) and len(old) == 3 and old[:2] == [st.st_size, st.st_mtime_ns]:
            digest = old[2]
        else:
            digest = file_sha256(path)
        files[path.name] = {"bytes": st.st_size, "sha256": digest}
        stats[path.name] = [st.st_size, st.st_mtime_ns, digest]
    return {"pattern": pattern, "files": files}, stats


def current_manifest(folder: str | os.PathLike, manifest: str | os.PathLike, pattern: str) -> dict:
    """The content manifest `folder` has now, with the stat cache of `manifest`, writing nothing
    (for a job whose tracked input is `manifest`, which may lag behind the folder)."""
    return content_manifest(folder, pattern, _read_stat(stat_path(manifest)))[0]


def refresh_manifest(folder: str | os.PathLike, manifest: str | os.PathLike, pattern: str) -> bool:
    """Bring the content manifest `manifest` of `folder` up to date, reading only the files whose
    size or modification time changed; the manifest is rewritten (atomically) only when the
    content differs from what it says, the stat cache whenever it changed. Returns whether the
    manifest was rewritten."""
    manifest = Path(manifest)
    cache_file = stat_path(manifest)
    cache = _read_stat(cache_file)
    new, stats = content_manifest(folder, pattern, cache)
    try:
        old = read_json(manifest)
    except (OSError, ValueError):
        old = None
    changed = old != new
    if changed:
        if isinstance(old, dict) and isinstance(old.get("files"), dict):
            before, after = old["files"], new["files"]
            log.info("%s: %d added, %d removed, %d changed", folder, len(after.keys() - before.keys()),
                     len(before.keys() - after.keys()), sum(before[k] != after[k] for k in before.keys() & after.keys()))
        write_json(manifest, new)
    if stats != cache:
        write_json(cache_file, stats)
    return changed
