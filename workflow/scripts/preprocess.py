# Raw files -> items, sequences and popularity Parquet files + stats.json, as the dataset's kind
# reads them (iisan.data.kinds: the Amazon format's items and users TSVs, the MicroLens format's
# pairs TSV and titles CSV); covers when given.
from pathlib import Path

from iisan.data import kinds
from iisan.pipeline.jobs import job

with job(snakemake):
    i, p = snakemake.input, snakemake.params
    options = dict(images=Path(i.images) if "images" in i.keys() else None, missing_images=p.missing_images,
                   bad_lines=p.bad_lines, **p.preprocess)
    out = Path(snakemake.output.stats).parent
    kinds.of(snakemake.config, snakemake.wildcards.dataset).preprocess_raw(dict(i.items()), out, **options)
