# Generate the demo dataset (raw TSVs and the image archive).
from pathlib import Path

from iisan.data.demo import DemoSpec, generate
from iisan.pipeline.jobs import job

with job(snakemake):
    generate(Path(snakemake.output.items_tsv).parent, DemoSpec(**snakemake.params.spec))
