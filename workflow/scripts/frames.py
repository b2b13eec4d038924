# Three frames of every item's video (positions from the config), in one zip with a manifest.
from pathlib import Path

import polars as pl

from iisan import plan
from iisan.frames import extract_all
from iisan.io import write_json
from iisan.jobs import job

with job(snakemake):
    i, p = snakemake.input, snakemake.params
    ids = pl.read_parquet(i.item_table)["item_id"].to_list()
    videos = Path(plan.MICROLENS_VIDEOS.format(dataset=snakemake.wildcards.dataset))
    manifest = extract_all(ids, videos, Path(snakemake.output.frames), p.positions, missing=p.missing)
    write_json(Path(snakemake.output.manifest), manifest)
