# Generate the MicroLens-format demo dataset (pairs TSV, titles CSV, covers zip, H.265 videos).
from pathlib import Path

from iisan.data.microlens_demo import generate
from iisan.pipeline.jobs import job

with job(snakemake):
    generate(Path(snakemake.output.pairs).parent, snakemake.params.spec)
