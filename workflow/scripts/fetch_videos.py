# Fetch the videos of a MicroLens dataset's kept items only (about 20-50 MB each), resuming where
# an interrupted run stopped; the record lists them.
from pathlib import Path

import polars as pl

from iisan.data.download import fetch_many
from iisan.io import write_json
from iisan.pipeline import plan
from iisan.pipeline.jobs import job

with job(snakemake):
    p, w = snakemake.params, snakemake.wildcards
    ids = pl.read_parquet(snakemake.input.item_table)["item_id"].to_list()
    got = fetch_many([f"{p.folder}/{i}.mp4" for i in ids], Path(plan.MICROLENS_VIDEOS.format(dataset=w.dataset)),
                     base_url=p.base_url, mirror=p.mirror or None)
    write_json(Path(snakemake.output[0]), {"videos": len(got), "fetched_now": sum(v is not None for v in got.values()),
                                           "sha256": got})
