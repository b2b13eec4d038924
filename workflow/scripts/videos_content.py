# The content manifest of a MicroLens dataset's videos (size and sha256 of each, iisan.data.folders):
# the frames rule's tracked input.
from pathlib import Path

from iisan.data.folders import refresh_manifest
from iisan.pipeline import plan
from iisan.pipeline.jobs import job

with job(snakemake):
    videos = Path(plan.MICROLENS_VIDEOS.format(dataset=snakemake.wildcards.dataset))
    refresh_manifest(videos, Path(snakemake.output[0]), "*.mp4")
