"""Datasets: reading, preprocessing and the generated demo."""

from __future__ import annotations

from pathlib import Path

from ..io import read_or_set_aside

# Item fields a tower can read, with the modality of each: columns of items.parquet, and the
# LLaVA captions of covers and video frames (CAPTION_FIELDS), text fields kept beside it in
# captions/<source>.parquet (iisan.captions).
ITEM_FIELDS = {"title": "text", "image": "image", "cover_caption": "text", "video_caption": "text"}
CAPTION_FIELDS = {"cover_caption": "cover", "video_caption": "video"}  # field -> caption source
CAPTIONS = "captions/{source}.parquet"  # beside items.parquet


def caption_file(items_parquet: Path, field: str) -> Path:
    """Where the captions of a caption field live, beside the dataset's items.parquet."""
    return Path(items_parquet).parent / CAPTIONS.format(source=CAPTION_FIELDS[field])


def item_texts(items_parquet: Path, field: str) -> list[str]:
    """The text of `field` for every item of items.parquet, in its order: a column of the table,
    or a caption field read from its caption file (every item must have a caption row)."""
    import polars as pl

    items = pl.read_parquet(items_parquet)
    if field in items.columns:
        return items[field].to_list()
    if field not in CAPTION_FIELDS:
        raise KeyError(f"{items_parquet}: no text field {field!r} (columns: {items.columns}; caption fields: "
                       f"{', '.join(CAPTION_FIELDS)})")
    path = caption_file(items_parquet, field)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no captions for field {field!r}; the workflow's caption rule makes them")
    rows = read_or_set_aside(path, lambda p: pl.read_parquet(p).select("item_id", "caption").rows(),
                             "the next run of the workflow captions the items again")
    captions = dict(rows)
    missing = [i for i in items["item_id"].to_list() if i not in captions]
    if missing:
        raise KeyError(f"{path}: no caption for {len(missing)} items of {items_parquet} (first: {missing[0]!r})")
    return [captions[i] for i in items["item_id"].to_list()]
