# LLaVA-NeXT captions of one dataset's covers or video frames (resumable; a manifest records the
# model, prompt, decoding settings and frame positions).
from pathlib import Path

from iisan.captions import caption_dataset
from iisan.jobs import job

with job(snakemake):
    i, p, w = snakemake.input, snakemake.params, snakemake.wildcards
    model = str(Path(i.captioner).parent) if "captioner" in i.keys() else p.captioner["source"]
    caption_dataset(Path(i.item_table), w.source, Path(i.images), model, Path(i.prompts), Path(snakemake.output[0]),
                    positions=p.positions, batch_size=p.batch_size, max_new_tokens=p.max_new_tokens,
                    revision=p.captioner.get("revision"), kv_cache=p.kv_cache,
                    attention=p.attention, workers=p.workers)
