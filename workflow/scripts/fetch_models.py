# One Hugging Face hub model into its folder (the output's parent), through the hub cache of the
# config key model_cache (read here, not a param: moving the cache refetches nothing).
from pathlib import Path

from iisan.encoders.models_fetch import fetch_model
from iisan.pipeline.jobs import job

with job(snakemake):
    p = snakemake.params
    fetch_model(p.repo_id, Path(snakemake.output[0]).parent, revision=p.revision, cache_dir=snakemake.config["model_cache"],
                what=p.what)
