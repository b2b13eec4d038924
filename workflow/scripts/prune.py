# Keep the hidden states of one tower's LayerDrop scheme from a full cache.
from pathlib import Path

from iisan.encoders.cache import prune_cache
from iisan.pipeline.jobs import job

with job(snakemake):
    prune_cache(Path(snakemake.input[0]).parent, Path(snakemake.output.array).parent, snakemake.params.layers)
