# The caption set of one dataset and source from its shards (iisan.captions.shards), in the item table's
# order, with the manifest one caption job would write.
from pathlib import Path

import polars as pl

from iisan.captions import merge_captions
from iisan.pipeline.jobs import job

with job(snakemake):
    ids = pl.read_parquet(snakemake.input.item_table)["item_id"].to_list()
    merge_captions(ids, list(snakemake.input.shards), Path(snakemake.output[0]))
