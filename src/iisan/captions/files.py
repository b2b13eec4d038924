"""Caption sets on disk, read without torch: the Parquet and its manifest (`read_caption_set`,
`load_captions`, `caption_texts`, which item fields read), the memo of captions reusable by
their images and settings (`memo_dir`), and the errors that name a damaged or mismatched set."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from iisan.io import DamagedFileError, read_json, set_aside, write_json, write_parquet

log = logging.getLogger("iisan.captions")
COLUMNS = ("item_id", "caption")


class CaptionError(ValueError):
    """A caption set that cannot be used as it is (missing or damaged files)."""


class CaptionMismatch(CaptionError):
    """A sound caption set made under other settings than the expected ones."""


class DamagedCaptions(CaptionError, DamagedFileError):
    """A caption set whose Parquet disagrees with its manifest (rows, columns, size, checksum),
    cannot be read, or lacks items; its Parquet and manifest have been moved aside (the message
    says where and what happens next)."""


# what happens after a caption set was moved aside
RECAPTION = "the next run of the workflow captions the items again (the captions its memo holds are reused, not recomputed)"


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def memo_dir(captions_parquet: str | os.PathLike) -> Path:
    """The memo of a caption set (reusable captions keyed by images and settings): ``<stem>.memo`` beside it."""
    captions_parquet = Path(captions_parquet)
    return captions_parquet.with_name(captions_parquet.stem + ".memo")


def settings_id(key: dict) -> str:
    """The memo folder name of a settings key: the first 16 hex digits of its canonical JSON's sha256."""
    return hashlib.sha256(json.dumps(jsonable(key), sort_keys=True).encode("utf-8")).hexdigest()[:16]


def manifest_path(out_parquet: str | os.PathLike) -> Path:
    out_parquet = Path(out_parquet)
    return out_parquet.with_name(out_parquet.stem + ".manifest.json")


def differences(stored: dict, expected: dict, keys: Iterable[str]) -> list[str]:
    def short(v: Any) -> str:
        s = json.dumps(v)
        return s if len(s) <= 80 else s[:77] + "..."

    missing = object()
    out = []
    for k in sorted(keys):
        if stored.get(k, missing) != expected.get(k, missing):
            have = short(stored[k]) if k in stored else "absent"
            want = short(expected[k]) if k in expected else "absent"
            out.append(f"{k} is {have}, expected {want}")
    return out


def plain_id(item_id: Any) -> Any:
    """An item id as JSON and Parquet hold it (numpy scalars become Python ones)."""
    return item_id.item() if hasattr(item_id, "item") else item_id


def images_sha256(digests: Iterable[str]) -> str:
    """The key of one item's images: the sha256 of the digests of its images, in prompt order."""
    return hashlib.sha256("\n".join(digests).encode("utf-8")).hexdigest()


def pixels_sha256(images: Sequence) -> str:
    """The key of PIL images by their pixels (mode, size and bytes of each)."""
    return images_sha256(hashlib.sha256(f"{im.mode} {im.width}x{im.height}".encode() + im.tobytes()).hexdigest() for im in images)


def _memo_records(path: Path) -> list[dict]:
    """The records of one memo file; a torn last line (a crash mid-append, or a job still
    appending) is dropped; a file with any other unreadable line is not used (logged)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
            out.append({"item_id": rec["item_id"], "images": str(rec["images"]), "caption": str(rec["caption"]),
                        "stopped": bool(rec["stopped"])})
        except (ValueError, KeyError, TypeError) as err:
            if n == len(lines) - 1:
                log.warning("%s: dropping a torn last record (%s)", path, err)
                break
            log.warning("not reusing the captions of %s: record %d is unreadable (%s)", path, n + 1, err)
            return []
    return out


def read_memo(memo: Path, key: dict) -> dict[str, tuple[str, bool]]:
    """{images key: (caption, stopped)} of every record file of `memo` under settings `key`;
    folders of other settings are left out, each with a log line naming the differences."""
    if not memo.is_dir():
        return {}
    here = memo / settings_id(key)
    for other in sorted(p for p in memo.iterdir() if p.is_dir() and p != here):
        try:
            old = read_json(other / "settings.json")
            differ = "; ".join(differences(old, key, set(old) | set(key))) if isinstance(old, dict) else "unreadable settings"
        except (OSError, ValueError) as err:
            differ = f"its settings are unreadable ({err})"
        log.warning("not reusing the captions in %s: made under other settings (%s)", other, differ)
    done: dict[str, tuple[str, bool]] = {}
    if here.is_dir():
        for path in sorted(here.glob("*.jsonl")):
            done.update((r["images"], (r["caption"], r["stopped"])) for r in _memo_records(path))
    return done


def prune_memo(memo: str | os.PathLike, key: dict, writers: Iterable[str]) -> None:
    """Keep only the record files of `writers` (the jobs that wrote the caption set) under
    settings `key` in the memo: records of other jobs and folders of other settings are removed."""
    memo = Path(memo)
    if not memo.is_dir():
        return
    here, keep = memo / settings_id(key), {f"{w}.jsonl" for w in writers}
    for folder in memo.iterdir():
        if folder.is_dir() and folder != here:
            shutil.rmtree(folder)
    for path in here.glob("*.jsonl"):
        if path.name not in keep:
            path.unlink()


def write_caption_set(out_parquet: Path, ids: list, texts: list[str], *, settings: dict, truncated: int, empty: int,
                       batch_size: int | str, device: Any, library_version: str, **extra) -> dict:
    """Write a caption set: the Parquet (``item_id``, ``caption``: `ids` and `texts` in order),
    then its manifest (the given fields, the item count, columns, the Parquet's bytes and
    checksum, and `extra`), which it returns. The old manifest is removed first: a stale one must
    not vouch for the new Parquet."""
    import polars as pl

    from iisan.encoders.cache_files import file_checksum

    manifest_file = manifest_path(out_parquet)
    manifest_file.unlink(missing_ok=True)
    write_parquet(pl.DataFrame({"item_id": ids, "caption": texts}), out_parquet)
    manifest = {
        "settings": settings, "items": len(ids), "columns": list(COLUMNS), "truncated": truncated, "empty": empty,
        "batch_size": batch_size, "device": device, "library_version": library_version,
        "bytes": out_parquet.stat().st_size, "checksum": file_checksum(out_parquet), **extra,
    }
    write_json(manifest_file, manifest)
    return manifest


def memo_record(item_id: Any, images: str, caption: str, stopped: bool) -> str:
    return json.dumps({"item_id": item_id, "images": images, "caption": caption, "stopped": stopped}, ensure_ascii=False) + "\n"


def set_caption_set_aside(out_parquet: str | os.PathLike, reason: str) -> list[Path]:
    """Move a caption set's Parquet and manifest aside (``<name>.damaged-<UTC time>``; nothing is
    deleted, and its memo stays) so that the workflow makes it again; returns their new paths."""
    out_parquet = Path(out_parquet)
    return [set_aside(f, reason) for f in (out_parquet, manifest_path(out_parquet)) if f.is_file()]


def _damaged(out_parquet: Path, why: str) -> DamagedCaptions:
    """Move the caption set aside and return the error that names it, why and what happens next."""
    moved = set_caption_set_aside(out_parquet, why)
    where = ", ".join(str(p) for p in moved) or "nothing to move"
    return DamagedCaptions(f"{out_parquet}: {why}; moved aside to {where}; {RECAPTION}")


def read_caption_set(out_parquet: str | os.PathLike):
    """(caption table, manifest) of the caption set `out_parquet`, the Parquet checked against
    its manifest (``<stem>.manifest.json``): readable, the columns ``item_id``, ``caption``, as
    many rows as the manifest's ``items``, its size and checksum. A caption set that fails is
    damaged: its Parquet and manifest are moved aside (`set_caption_set_aside`) and
    `DamagedCaptions` names the file, the failure and the new names; the workflow's next run makes
    it again from its memo. A missing Parquet raises `CaptionError`."""
    import polars as pl

    from iisan.encoders.cache_files import file_checksum

    out_parquet = Path(out_parquet)
    mpath = manifest_path(out_parquet)
    if not out_parquet.is_file():
        raise CaptionError(f"{out_parquet}: missing" + (f" ({mpath.name} describes it)" if mpath.is_file() else "")
                           + "; the workflow's caption rule makes it")
    if not mpath.is_file():
        raise _damaged(out_parquet, f"no manifest {mpath.name} beside it (nothing vouches for its content)")
    try:
        m = read_json(mpath)
    except ValueError as err:
        raise _damaged(out_parquet, f"its manifest {mpath.name} is not valid JSON ({err})") from None
    if not isinstance(m, dict) or not isinstance(m.get("settings"), dict):
        raise _damaged(out_parquet, f"its manifest {mpath.name} has no `settings` object")
    try:
        frame = pl.read_parquet(out_parquet)
    except Exception as err:  # polars raises several kinds on a damaged file
        if isinstance(err, MemoryError):
            raise
        raise _damaged(out_parquet, f"unreadable ({type(err).__name__}: {err})") from err
    if tuple(frame.columns) != COLUMNS or frame.height != m.get("items"):
        raise _damaged(out_parquet, f"columns {frame.columns} and {frame.height} rows, but its manifest {mpath.name} says "
                                    f"{list(COLUMNS)} and {m.get('items')} items")
    if out_parquet.stat().st_size != m.get("bytes") or file_checksum(out_parquet) != m.get("checksum"):
        raise _damaged(out_parquet, f"its content does not match the size and checksum in its manifest {mpath.name} "
                                    "(replaced or damaged)")
    return frame, m


def load_captions(out_parquet: str | os.PathLike, expected_settings: dict):
    """The caption table (``item_id``, ``caption``) of `out_parquet` after checking it against
    its manifest (`read_caption_set`: a damaged caption set is moved aside) and every key of
    `expected_settings` (usually `caption_settings(...)`; a key it leaves out is not checked,
    e.g. ``dtype`` when the reader runs elsewhere). Raises `CaptionMismatch` naming each
    setting that differs (the caption set stays: it is sound)."""
    frame, m = read_caption_set(out_parquet)
    expected = jsonable(expected_settings)
    differ = differences(m["settings"], expected, expected.keys())
    if differ:
        raise CaptionMismatch(f"captions {out_parquet} were made under other settings: " + "; ".join(differ))
    return frame


def caption_texts(out_parquet: str | os.PathLike, item_ids: Sequence, items_parquet: str | os.PathLike | None = None) -> list[str]:
    """The caption of every item of `item_ids`, in that order, from the caption set `out_parquet`
    (`read_caption_set`; a Parquet without a manifest is read unchecked, with a warning). A
    caption set that is damaged, or lacks a caption for any of the items (made for other items,
    or cut short), is moved aside and named in the error: the workflow's next run makes it again,
    taking the captions its memo holds."""
    import polars as pl

    from iisan.io import read_or_set_aside

    out_parquet = Path(out_parquet)
    if manifest_path(out_parquet).is_file() or not out_parquet.is_file():
        frame, _ = read_caption_set(out_parquet)
    else:
        log.warning("%s: no manifest %s beside it; its rows are not checked against one", out_parquet,
                    manifest_path(out_parquet).name)
        frame = read_or_set_aside(out_parquet, lambda p: pl.read_parquet(p).select(COLUMNS), RECAPTION)
    captions = dict(zip(frame["item_id"].to_list(), frame["caption"].to_list()))
    ids = [plain_id(i) for i in item_ids]
    missing = [i for i in ids if i not in captions]
    if missing:
        of = f" of {items_parquet}" if items_parquet is not None else ""
        raise _damaged(out_parquet, f"no caption for {len(missing)} of the {len(ids)} items{of} (first: {missing[0]!r}; "
                                    f"it holds {frame.height} rows)")
    return [captions[i] for i in ids]
