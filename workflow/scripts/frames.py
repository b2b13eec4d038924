# Three frames of every item's video (positions from the config), in one zip with a manifest; the
# frames of videos whose sha256 is unchanged are taken from the previous zip, which the rule marks
# as updated in place. The sha256s are the folder's now (the content manifest's stat cache saves
# reading unchanged files), not the tracked manifest's, which only triggers this job. The videos
# are decoded on the job's threads, and the finished ones kept in the work folder beside the zip,
# from which a stopped job's next attempt resumes (iisan.data.frames).
from pathlib import Path

import polars as pl

from iisan.data.folders import current_manifest
from iisan.data.frames import extract_all
from iisan.io import write_json
from iisan.pipeline import plan
from iisan.pipeline.jobs import job

with job(snakemake):
    i, p, o = snakemake.input, snakemake.params, snakemake.output
    ids = pl.read_parquet(i.item_table)["item_id"].to_list()
    videos = Path(plan.MICROLENS_VIDEOS.format(dataset=snakemake.wildcards.dataset))
    content = current_manifest(videos, i.videos, "*.mp4")
    sha = {name: f["sha256"] for name, f in content["files"].items()}
    manifest = extract_all(ids, videos, Path(o.frames), p.positions, missing=p.missing, video_sha256=sha,
                           previous=Path(o.frames), threads=snakemake.threads)
    write_json(Path(o.manifest), manifest)
