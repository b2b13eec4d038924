# Raw items/users TSVs (and covers) -> items, sequences and popularity Parquet files + stats.json.
from pathlib import Path

from iisan.data.amazon import preprocess
from iisan.jobs import job

with job(snakemake):
    i, p = snakemake.input, snakemake.params
    preprocess(Path(i.items_tsv), Path(i.users_tsv), Path(snakemake.output.stats).parent,
               images=Path(i.images) if "images" in i.keys() else None, missing_images=p.missing_images,
               bad_lines=p.bad_lines, **p.preprocess)
