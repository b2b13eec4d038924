"""Reading MicroLens-100k (https://recsys.westlake.edu.cn/MicroLens-100k-Dataset/) and
preprocessing it exactly as the Amazon datasets (amazon.py, docs/method.md §1).

``MicroLens-100k_pairs.tsv`` is ``user_id \\t item item ...`` (oldest first), the layout of the
Amazon users file, so `amazon.read_users` reads it. ``MicroLens-100k_title_en.csv`` has no
header; each line is ``item_id,title`` where the title is everything after the FIRST comma,
taken literally: no CSV quoting rules, so ``123,Hello, world`` has title ``Hello, world`` and a
title wrapped in double quotes keeps its quotes (the dataset's own reader splits the same way,
and unquoting would change the text the backbones see). Byte-order mark, CRLF endings, invalid
UTF-8 and empty lines are handled as in the Amazon readers. Covers ``<item_id>.jpg`` go in a zip
archive, matched by file stem as for Amazon.
"""

from __future__ import annotations

from pathlib import Path

from iisan.data.amazon import Counters, _bad, _lines, _titles
from iisan.data.amazon import preprocess as _preprocess

# The published file names (the workflow keeps them under resources/raw/<dataset>/; covers in a
# zip archive of MicroLens-100k_covers/<item_id>.jpg)
PAIRS = "MicroLens-100k_pairs.tsv"
TITLES = "MicroLens-100k_title_en.csv"
COVERS = "covers.zip"
COVERS_DIR = "MicroLens-100k_covers"
VIDEOS = "MicroLens-100k_videos"
SITE = "https://recsys.westlake.edu.cn/MicroLens-100k-Dataset"

# The paper's Table I for MicroLens-100k: raw users, items and interactions (stats.json's
# raw_users, raw_items, raw_interactions).
TABLE_I = {"users": 100_000, "items": 19_738, "interactions": 719_405}

# The authors' training defaults from their MicroLens script, as `dataset_train.MicroLens` of
# config/paper.yaml sets them (a test compares the two); `max_tokens` is the title length.
TRAINING_DEFAULTS = {"batch_size": 512, "lr_main": 2e-4, "max_epochs": 200, "max_tokens": 30}


def _csv_records(path: Path, policy: str, counters: Counters):
    """(where, item_id, title) for each line: split at the first comma only."""
    for where, line in _lines(path, policy, counters):
        item_id, comma, title = line.partition(",")
        if not comma:
            _bad(policy, where, "no comma between item id and title", counters)
            continue
        yield where, item_id.strip(), title


def read_titles_csv(path: Path, policy: str = "error", counters: Counters | None = None) -> dict[str, str]:
    """item_id -> title, in file order, from ``MicroLens-100k_title_en.csv``. Bad lines (invalid
    UTF-8, empty line, no comma, empty id, empty title, duplicate id) are errors naming file and
    line, or under ``bad_lines: skip`` skipped and counted, exactly as `amazon.read_items`."""
    counters = counters or Counters()
    return _titles(_csv_records(Path(path), policy, counters), Path(path), policy, counters)


def preprocess(pairs_tsv: Path, titles_csv: Path, out_dir: Path, **options) -> dict:
    """`amazon.preprocess` (same keywords, same outputs) with the titles read from the CSV."""
    return _preprocess(titles_csv, pairs_tsv, out_dir, items_reader=read_titles_csv, **options)


# --- the MicroLens dataset kinds (iisan.data.kinds: microlens, microlens-demo) -----------------
INPUTS = ("pairs", "titles")  # the raw files `preprocess` reads, as rule preprocess names them
PUBLISHED = ("pairs", "titles", "covers")  # the entry's keys of the published files, as the twin writes them


def raw_files(dataset: str, source: dict) -> dict[str, str]:
    """Where the workflow keeps a dataset's pairs TSV and titles CSV (fetched, or generated)."""
    from iisan.data.paths import MICROLENS_RAW

    return {"pairs": MICROLENS_RAW.format(dataset=dataset, name=PAIRS), "titles": MICROLENS_RAW.format(dataset=dataset, name=TITLES)}


def covers(dataset: str, source: dict) -> str:
    """Where the workflow keeps a dataset's cover archive (fetched, or generated)."""
    from iisan.data.paths import MICROLENS_RAW

    return MICROLENS_RAW.format(dataset=dataset, name=COVERS)


def images(dataset: str, source: dict) -> str | None:
    """MicroLens-100k's covers: the archive rule fetch_microlens fetches when the entry names
    ``covers``, else as an Amazon dataset's (`amazon.images`)."""
    from iisan.data.amazon import images as given

    return covers(dataset, source) if source.get("covers") else given(dataset, source)
