"""Datasets: the dataset-kind registry (`kinds`), the Amazon and MicroLens readers and their
preprocessing, the generated demo and MicroLens twin, item images, video frames, downloads, content
manifests of input folders, and the item fields a tower reads."""

from __future__ import annotations

from pathlib import Path

# Item fields a tower can read, with the modality of each: columns of items.parquet, and the
# LLaVA captions of covers and video frames (CAPTION_FIELDS), text fields kept beside it in
# captions/<source>.parquet (iisan.captions).
ITEM_FIELDS = {"title": "text", "image": "image", "cover_caption": "text", "video_caption": "text"}
CAPTION_FIELDS = {"cover_caption": "cover", "video_caption": "video"}  # field -> caption source
CAPTIONS = "captions/{source}.parquet"  # beside items.parquet


def caption_file(items_parquet: Path, field: str) -> Path:
    """Where the captions of a caption field live, beside the dataset's items.parquet."""
    return Path(items_parquet).parent / CAPTIONS.format(source=CAPTION_FIELDS[field])


def item_texts(items_parquet: Path, field: str, captions: Path | None = None) -> list[str]:
    """The text of `field` for every item of items.parquet, in its order: a column of the table,
    or a caption field read from its caption set `captions` (default: the one beside the table,
    `caption_file`; `iisan.captions.files.caption_texts`: checked against its manifest, a caption
    for every item; one that fails is moved aside and remade by the next run)."""
    import polars as pl

    items = pl.read_parquet(items_parquet)
    if field in items.columns:
        return items[field].to_list()
    if field not in CAPTION_FIELDS:
        raise KeyError(f"{items_parquet}: no text field {field!r} (columns: {items.columns}; caption fields: "
                       f"{', '.join(CAPTION_FIELDS)})")
    path = Path(captions) if captions is not None else caption_file(items_parquet, field)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no captions for field {field!r}; the workflow's caption rule makes them")
    from iisan.captions.files import caption_texts  # checked against its manifest; a damaged caption set is moved aside

    return caption_texts(path, items["item_id"].to_list(), items_parquet)
