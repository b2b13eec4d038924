# An Amazon dataset's image archive: from the mirror, else downloaded from the authors' link.
from pathlib import Path

from iisan.data.download import fetch_images
from iisan.pipeline.jobs import job

with job(snakemake):
    p = snakemake.params
    fetch_images(snakemake.wildcards.dataset, p.images, Path(snakemake.output[0]), mirror=p.mirror or None)
