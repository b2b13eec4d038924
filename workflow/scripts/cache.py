# Cache every hidden state of one backbone over one item field, from the backbone's folder that
# the workflow made or fetched: no hub access on a compute node (HF_HUB_OFFLINE before any import).
# The job (iisan.encoders.cache_job.CacheJob) is the rule's one param; its files are the rule's
# input and output.
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from iisan.encoders.backbones import resolve_source
from iisan.encoders.cache import build_cache
from iisan.encoders.cache_job import CacheJob
from iisan.pipeline.jobs import job

with job(snakemake):
    i = snakemake.input
    cache_job = CacheJob.from_dict(snakemake.params.job)
    path = resolve_source(cache_job.spec, Path(i.standin).parent if "standin" in i.keys() else None)
    build_cache(cache_job, path, Path(i.item_table), Path(snakemake.output.array).parent,
                images_archive=Path(i.images) if "images" in i.keys() else None,
                captions=Path(i.captions0) if "captions0" in i.keys() else None)
