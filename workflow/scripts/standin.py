# Build a randomly initialised demo stand-in of one registry backbone.
from pathlib import Path

from iisan.encoders.backbones import build_standin_from_config
from iisan.pipeline.jobs import job

with job(snakemake):
    build_standin_from_config(snakemake.wildcards.backbone, snakemake.params.spec, Path(snakemake.input.titles),
                              Path(snakemake.output[0]).parent)
