# Download one published raw file, or copy it from the configured mirror; checked by sha256.
from pathlib import Path

from iisan.data.download import fetch
from iisan.pipeline.jobs import job

with job(snakemake):
    p = snakemake.params
    fetch(p.relpath, Path(snakemake.output[0]), base_url=p.base_url, mirror=p.mirror or None,
          expected_sha256=p.sha256 or None)
