# Fig. 6: full vs dropped cache sizes, measured from the manifests and computed from the registry.
from pathlib import Path

from iisan.pipeline.jobs import job
from iisan.tables.figures import fig6

with job(snakemake):
    p = snakemake.params
    manifests = [Path(a).with_name("manifest.json") for a in snakemake.input]
    fig6(p.backbones, manifests, p.n_items, snakemake.output.png, snakemake.output.csv, demo=p.demo, cache_dtype=p.cache_dtype)
