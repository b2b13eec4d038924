"""Reading the authors' TSV files and preprocessing them exactly as docs/method.md §1 describes.

Items file: ``item_id \\t title`` (no header). Users file: ``user_id \\t item item ...``
(oldest first). Users with fewer than `min_interactions` interactions are dropped, each kept
user keeps the last `window` items, items are re-indexed 1..N in items-file order keeping only
those that occur in a kept window (0 is padding). The evaluation inputs are the T = window - 3
items before each target (T: the user encoder's `max_len`; the authors keep max_seq_len + 3
items). Other datasets with a users file in this layout (MicroLens-100k, see microlens.py)
reuse `preprocess` with their own titles reader.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from iisan.data.errors import DataError
from iisan.io import write_json, write_parquet

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# The paper's Table I: users, items and interactions after preprocessing (docs/method.md §1)
TABLE_I = {
    "Scientific": {"users": 12_076, "items": 20_314, "interactions": 81_711},
    "Instrument": {"users": 10_000, "items": 19_246, "interactions": 75_022},
    "Office": {"users": 10_000, "items": 22_785, "interactions": 71_276},
}


@dataclass
class Counters:
    skipped_lines: list[str] = field(default_factory=list)
    repaired_lines: list[str] = field(default_factory=list)


def _bad(policy: str, where: str, what: str, counters: Counters) -> None:
    if policy == "skip":
        log.warning("skipping %s: %s", where, what)
        counters.skipped_lines.append(f"{where}: {what}")
    else:
        raise DataError(
            f"{where}: {what} (set bad_lines: skip in the config to skip and count such lines)"
        )


def _strip_bom(raw: bytes, where: str, lineno: int, counters: Counters) -> bytes:
    """Remove and count a UTF-8 byte-order mark at the very start of the file: kept, it
    would become part of the first id. A BOM anywhere else is ordinary data."""
    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
        counters.repaired_lines.append(f"{where}: UTF-8 byte-order mark removed")
        return raw[len(codecs.BOM_UTF8) :]
    return raw


def _invalid_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    """What is wrong with an undecodable line: the first bad byte and its (1-based)
    character column, so that it can be found in an editor."""
    column = len(raw[: err.start].decode("utf-8")) + 1
    return f"invalid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})"


def _lines(path: Path, policy: str, counters: Counters):
    """(where, line) for each line of a text file, without its ending; a leading byte-order
    mark and CRLF endings are repaired and counted; invalid UTF-8, a carriage return inside a
    line and empty lines are errors (or the whole line is skipped and counted: a record is
    never kept cut short). Read in binary so that a bad byte spoils one line (named by file and
    line), not the whole file. Lines end at \\n only: a lone \\r is not a line end."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):  # a binary file's lines end at b"\\n"
            where = f"{path}:{lineno}"
            raw = _strip_bom(raw, where, lineno, counters)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                _bad(policy, where, _invalid_utf8(raw, err), counters)
                continue
            line = text.removesuffix("\n")
            if text.endswith("\r\n"):
                line = line[:-1]
                counters.repaired_lines.append(f"{where}: CRLF line ending")
            if "\r" in line:
                column = line.index("\r") + 1
                _bad(policy, where, f"carriage return (\\r) inside the line at column {column} (only \\n or \\r\\n ends a line)", counters)
                continue
            if not line.strip():
                _bad(policy, where, "empty line", counters)
                continue
            yield where, line


def _records(path: Path, policy: str, counters: Counters, names: str):
    """(where, key, value) for each line of a two-column TSV (see `_lines`); wrong field
    counts are errors (or skipped and counted)."""
    for where, line in _lines(path, policy, counters):
        parts = line.split("\t")
        if len(parts) != 2:
            _bad(policy, where, f"expected 2 tab-separated fields ({names}), found {len(parts)}", counters)
            continue
        yield where, parts[0].strip(), parts[1]


def read_items(path: Path, policy: str = "error", counters: Counters | None = None) -> dict[str, str]:
    """item_id -> title, in file order."""
    counters = counters or Counters()
    return _titles(_records(path, policy, counters, "item_id, title"), path, policy, counters)


def _titles(records: Iterable[tuple[str, str, str]], path: Path, policy: str, counters: Counters) -> dict[str, str]:
    """item_id -> title, in file order, from (where, item_id, title) records of any items
    file: empty ids, empty titles and duplicate ids are errors (or skipped and counted)."""
    items: dict[str, str] = {}
    for where, item_id, title in records:
        if not item_id:
            _bad(policy, where, "empty item id", counters)
            continue
        if not title.strip():
            _bad(policy, where, f"empty title for item {item_id!r}", counters)
            continue
        if item_id in items:
            _bad(policy, where, f"duplicate item id {item_id!r}", counters)
            continue
        items[item_id] = title
    if not items:
        raise DataError(f"{path}: no items")
    return items


def read_users(
    path: Path, known_items: dict[str, str], policy: str = "error", counters: Counters | None = None
) -> list[tuple[str, list[str]]]:
    counters = counters or Counters()
    users: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for where, user_id, seq_text in _records(path, policy, counters, "user_id, items"):
        seq = seq_text.split()
        if seq != seq_text.split(" "):
            counters.repaired_lines.append(f"{where}: irregular whitespace in the item list")
        if not user_id or not seq:
            _bad(policy, where, "empty user id or empty item list", counters)
            continue
        unknown = [i for i in seq if i not in known_items]
        if unknown:
            _bad(policy, where, f"unknown item id {unknown[0]!r} in the sequence of user {user_id!r}", counters)
            continue
        if user_id in seen:
            _bad(policy, where, f"duplicate user id {user_id!r}", counters)
            continue
        seen.add(user_id)
        users.append((user_id, seq))
    return users


def item_order_hash(item_ids: list[str]) -> str:
    """Hash of the item order (row i of every cache is item i)."""
    h = hashlib.sha256()
    for i in item_ids:
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _image_index(archive: Path) -> dict[str, str]:
    """item_id -> member name of a zip archive of <item_id>.jpg files, at its top level or in a
    folder (the authors' archives hold ``am_image_is/<item_id>.jpg``); macOS metadata
    (``__MACOSX/``, ``._<name>``) is skipped."""
    with zipfile.ZipFile(archive) as zf:
        out = {}
        for name in zf.namelist():
            base = Path(name).name
            if name.startswith("__MACOSX/") or base.startswith("._"):
                continue
            stem, dot, ext = base.rpartition(".")
            if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS:
                out[stem] = name
    return out


def _item_images(archive: Path, order: list[str], missing_images: str, dataset: str) -> tuple[list[str | None], list[str]]:
    """(member of each item's image or None, items given a blank image): every item's image is
    decoded once (`iisan.data.images.image_problem`); an item without an image, or whose image does
    not decode (empty, truncated, not an image), stops preprocessing naming the item, the member,
    the archive and the config key dataset_sources.<dataset>.missing_images (`dataset`: the
    dataset's folder, named after its entry), or with ``missing_images: blank`` gets a blank
    image (None) and is counted with the blank ones."""
    from iisan.data.images import UndecodableImage, image_problem, missing_images_key, undecodable

    available = _image_index(archive)
    names: list[str | None] = [None] * len(order)
    blanks: list[str] = []
    bad: list[str] = []
    with zipfile.ZipFile(archive) as zf:
        for n, item in enumerate(order):
            member = available.get(item)
            why = None if member is None else image_problem(zf, member)
            if member is not None and why is None:
                names[n] = member
            elif missing_images == "blank":
                blanks.append(item)
                if member is not None:
                    bad.append(item)
                    log.warning("%s: the image of item %r (member %r) cannot be decoded (%s); using a blank image "
                                "(missing_images: blank)", archive, item, member, why)
            elif member is None:
                raise DataError(f"{archive}: no image for item {item!r} (set {missing_images_key(dataset)} in the config "
                                "to give it a blank image)")
            else:
                raise UndecodableImage(undecodable(archive, member, item, why, dataset))
    if blanks:
        log.warning("%d items have no image in %s (%d of them one that does not decode); using a blank image",
                    len(blanks), archive, len(bad))
    return names, blanks


MIN_WINDOW = 4  # T = window - 3 >= 1 evaluation input
MIN_INTERACTIONS = 3  # a training item, a validation and a test target


def _check_trainable(users_tsv: Path, kept: list[tuple[str, list[str]]], n_items: int, min_interactions: int) -> None:
    """Stop on data that would train and evaluate without meaning: users whose training history
    is empty, a single user (the loss's negatives are the other users' items: its loss is 0),
    or no more items than the top-K of the metrics (every target would be a hit)."""
    from iisan.config import TrainConfig

    short = sum(len(seq) < MIN_INTERACTIONS for _, seq in kept)
    if short:
        raise DataError(f"{users_tsv}: {short} of {len(kept)} users have fewer than {MIN_INTERACTIONS} interactions, so their "
                        f"training history is empty (preprocess.min_interactions is {min_interactions}; use at least {MIN_INTERACTIONS})")
    if len(kept) < 2:
        raise DataError(f"{users_tsv}: only {len(kept)} user has at least {min_interactions} interactions; training needs 2 or "
                        "more (the in-batch loss takes its negatives from the other users)")
    k = TrainConfig.k
    if n_items <= k:
        raise DataError(f"{users_tsv}: {n_items} items after preprocessing ({len(kept)} users), not more than the top-{k} of "
                        f"HR@{k} and NDCG@{k}: every test target would be a hit")


def preprocess(
    items_tsv: Path,
    users_tsv: Path,
    out_dir: Path,
    *,
    min_interactions: int = 5,
    window: int = 13,
    bad_lines: str = "error",
    images: Path | None = None,
    missing_images: str = "error",
    items_reader: Callable[[Path, str, Counters], dict[str, str]] = read_items,
) -> dict:
    """Preprocess one dataset into `out_dir` (items.parquet, sequences.parquet,
    popularity.parquet, stats.json). Returns the stats. `items_reader(path, bad_lines,
    counters)` reads the titles file (item_id -> title in file order): `read_items` for the
    Amazon TSV, `microlens.read_titles_csv` for MicroLens."""
    items_tsv, users_tsv, out_dir = Path(items_tsv), Path(users_tsv), Path(out_dir)
    if window < MIN_WINDOW:
        raise ValueError(f"preprocess.window: {window} keeps no evaluation input (T = window - 3 items; at least {MIN_WINDOW})")
    max_len = window - 3  # T: the evaluation inputs, the items before the validation and the test target
    counters = Counters()
    titles = items_reader(items_tsv, bad_lines, counters)
    users = read_users(users_tsv, titles, bad_lines, counters)

    kept = [(u, seq[-window:]) for u, seq in users if len(seq) >= min_interactions]
    if not kept:
        raise DataError(f"{users_tsv}: no user has at least {min_interactions} interactions")
    used = {i for _, seq in kept for i in seq}
    order = [i for i in titles if i in used]  # items-file order
    _check_trainable(users_tsv, kept, len(order), min_interactions)
    index = {item: n for n, item in enumerate(order, start=1)}

    image_names: list[str | None] = [None] * len(order)
    blanks: list[str] = []
    if images is not None:
        image_names, blanks = _item_images(Path(images), order, missing_images, out_dir.name)

    items_df = pl.DataFrame(
        {
            "item": pl.Series(range(1, len(order) + 1), dtype=pl.Int32),
            "item_id": pl.Series(order, dtype=pl.String),
            "title": pl.Series([titles[i] for i in order], dtype=pl.String),
            "image": pl.Series(image_names, dtype=pl.String),
        }
    )

    seqs = [[index[i] for i in seq] for _, seq in kept]
    seq_df = pl.DataFrame(
        {
            "user": pl.Series(range(1, len(kept) + 1), dtype=pl.Int32),
            "user_id": pl.Series([u for u, _ in kept], dtype=pl.String),
            "sequence": pl.Series(seqs, dtype=pl.List(pl.Int32)),
            "train": pl.Series([s[:-2] for s in seqs], dtype=pl.List(pl.Int32)),
            "valid_input": pl.Series([s[:-2][-max_len:] for s in seqs], dtype=pl.List(pl.Int32)),
            "valid_target": pl.Series([s[-2] for s in seqs], dtype=pl.Int32),
            "test_input": pl.Series([s[:-1][-max_len:] for s in seqs], dtype=pl.List(pl.Int32)),
            "test_target": pl.Series([s[-1] for s in seqs], dtype=pl.Int32),
        }
    )

    counts = [0] * (len(order) + 1)
    for s in seqs:
        for i in s[:-2]:
            counts[i] += 1
    total = sum(counts)
    prob = [1.0] + [c / total for c in counts[1:]]
    pop_df = pl.DataFrame(
        {
            "item": pl.Series(range(len(counts)), dtype=pl.Int32),
            "count": pl.Series(counts, dtype=pl.Int64),
            "p": pl.Series(prob, dtype=pl.Float64),
        }
    )

    stats = {
        "users": len(kept),
        "items": len(order),
        "interactions": sum(len(s) for s in seqs),
        "raw_users": len(users),
        "raw_items": len(titles),
        "raw_interactions": sum(len(seq) for _, seq in users),  # Table I counts raw users, items, interactions
        "skipped_lines": len(counters.skipped_lines),
        "repaired_lines": len(counters.repaired_lines),
        "skipped": counters.skipped_lines[:100],
        "repaired": counters.repaired_lines[:100],
        "blank_images": len(blanks),
        "blank_image_items": blanks[:100],
        "item_order_hash": item_order_hash(order),
        "min_interactions": min_interactions,
        "window": window,
        "max_len": max_len,
    }
    # Write everything to temporaries first (each write is atomic); stats.json goes last so
    # its presence means the dataset is complete.
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(items_df, out_dir / "items.parquet")
    write_parquet(seq_df, out_dir / "sequences.parquet")
    write_parquet(pop_df, out_dir / "popularity.parquet")
    write_json(out_dir / "stats.json", stats)
    return stats


# --- the Amazon dataset kinds (iisan.data.kinds: amazon, and demo in this format) ---------------
INPUTS = ("items_tsv", "users_tsv")  # the raw files `preprocess` reads, as rule preprocess names them


def raw_files(dataset: str, source: dict) -> dict[str, str]:
    """Where the workflow keeps a dataset's items and users TSVs (fetched, or generated)."""
    from iisan.data.paths import RAW

    return {"items_tsv": RAW.format(dataset=dataset, kind="items"), "users_tsv": RAW.format(dataset=dataset, kind="users")}


def images(dataset: str, source: dict) -> str | None:
    """An Amazon dataset's covers: where rule fetch_amazon_images puts the archive when ``images``
    says where to download it ({file, url, sha256}), else the path ``images`` gives (None: none)."""
    from iisan.data.paths import RAW_IMAGES

    given = source.get("images")
    return RAW_IMAGES.format(dataset=dataset) if isinstance(given, dict) else given or None


def twin(tmp: Path, source: dict, mirror: Path) -> dict[str, str]:
    """The rehearsal's twin of an Amazon dataset (`iisan.pipeline.rehearsal.build_mirror`): items and users
    TSVs from `iisan.data.demo.generate` with the entry's ``demo`` settings, and, when ``images``
    names an archive file, the demo's covers in it as the authors publish theirs."""
    from iisan.data import demo
    from iisan.data.twins import authors_archive, file_sha256, place

    raw = demo.generate(tmp, demo.DemoSpec(**(source.get("demo") or {})))
    files = {source[key]: file_sha256(place(raw[key], mirror, source[key])) for key in ("items", "users")}
    archive = source.get("images")
    if isinstance(archive, dict) and archive.get("file"):
        authors_archive(raw["images"], mirror / archive["file"])
        files[archive["file"]] = file_sha256(mirror / archive["file"])
    return files
