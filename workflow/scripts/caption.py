# LLaVA-NeXT captions of one dataset's covers or video frames, or of one shard of them
# (iisan.shards); resumable, reusing the captions of unchanged images (a manifest records the
# model, prompt, decoding settings and frame positions).
import os
from pathlib import Path

# growing segments instead of fixed blocks: prompts of several lengths do not fragment the cards
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from iisan.captions import caption_dataset, memo_dir
from iisan.io import check_model_folder
from iisan.jobs import job

with job(snakemake):
    i, p, w = snakemake.input, snakemake.params, snakemake.wildcards
    model = str(Path(i.captioner).parent) if "captioner" in i.keys() else p.captioner["source"]
    if "captioner" in i.keys():  # a stand-in: a damaged one is moved aside and built again by the next run
        check_model_folder(model, "the next run of the workflow builds it again")
    sharded = "shard" in w.keys()
    caption_dataset(Path(i.item_table), w.source, Path(i.images), model, Path(i.prompts), Path(snakemake.output[0]),
                    positions=p.positions, batch_size=p.batch_size, max_new_tokens=p.max_new_tokens,
                    revision=p.captioner.get("revision"), kv_cache=p.kv_cache,
                    shard=(int(w.shard), int(w.shards)) if sharded else (1, 1), memo=memo_dir(p.captions) if sharded else None,
                    attention=p.attention, workers=p.workers)
