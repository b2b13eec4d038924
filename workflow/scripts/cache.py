# Cache every hidden state of one backbone over one item field, from the backbone's folder that
# the workflow made or fetched: no hub access on a compute node (HF_HUB_OFFLINE before any import).
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from iisan.encoders.backbones import BackboneSpec, resolve_source
from iisan.encoders.cache import build_cache
from iisan.pipeline.jobs import job

with job(snakemake):
    i, p = snakemake.input, snakemake.params
    spec = BackboneSpec.from_config(snakemake.wildcards.backbone, p.spec)
    path = resolve_source(spec, Path(i.standin).parent if "standin" in i.keys() else None)
    build_cache(spec, path, Path(i.item_table), snakemake.wildcards.field, Path(snakemake.output.array).parent,
                images_archive=Path(i.images) if "images" in i.keys() else None, batch_size=p.batch_size,
                store_dtype=p.store_dtype, captions=Path(i.captions0) if "captions0" in i.keys() else None)
