# Raw files -> items, sequences and popularity Parquet files + stats.json: the Amazon format
# (items and users TSVs) or the MicroLens format (pairs TSV, titles CSV); covers when given.
from pathlib import Path

from iisan.data import amazon, microlens
from iisan.jobs import job

with job(snakemake):
    i, p = snakemake.input, snakemake.params
    options = dict(images=Path(i.images) if "images" in i.keys() else None, missing_images=p.missing_images,
                   bad_lines=p.bad_lines, **p.preprocess)
    out = Path(snakemake.output.stats).parent
    if "pairs" in i.keys():
        microlens.preprocess(Path(i.pairs), Path(i.titles), out, **options)
    else:
        amazon.preprocess(Path(i.items_tsv), Path(i.users_tsv), out, **options)
