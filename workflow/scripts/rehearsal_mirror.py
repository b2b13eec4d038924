# The rehearsal: one dataset's twin in the mirror, under the published file names.
from pathlib import Path

from iisan.io import write_json
from iisan.pipeline.jobs import job
from iisan.pipeline.rehearsal import build_mirror

with job(snakemake):
    p = snakemake.params
    write_json(Path(snakemake.output[0]), build_mirror(snakemake.wildcards.dataset, p.source, p.mirror))
