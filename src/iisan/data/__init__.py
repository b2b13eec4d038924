"""Datasets: reading, preprocessing and the generated demo."""

# Item fields a tower can read (columns of items.parquet), with the modality of each.
ITEM_FIELDS = {"title": "text", "image": "image"}
