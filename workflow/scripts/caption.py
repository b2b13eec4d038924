# LLaVA-NeXT captions of one dataset's covers or video frames, or of one shard of them
# (iisan.captions.shards); resumable, reusing the captions of unchanged images (a manifest records the
# model, prompt, decoding settings and frame positions). The job (iisan.captions.CaptionJob) is
# the rule's one param; its files are the rule's input and output.
import os
from pathlib import Path

# growing segments instead of fixed blocks: prompts of several lengths do not fragment the cards
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from iisan.captions import CaptionJob, caption_dataset
from iisan.io import check_model_folder
from iisan.pipeline.jobs import job

with job(snakemake):
    i = snakemake.input
    spec = CaptionJob.from_dict(snakemake.params.job)
    if "captioner" in i.keys():  # a stand-in: a damaged one is moved aside and built again by the next run
        check_model_folder(spec.captioner, "the next run of the workflow builds it again")
    caption_dataset(spec, Path(i.item_table), Path(i.images), Path(i.prompts), Path(snakemake.output[0]))
