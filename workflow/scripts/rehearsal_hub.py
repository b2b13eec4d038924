# The rehearsal: one registry model's same-family stand-in as its hub snapshot in the hub cache
# (tokenizer trained on the stand-in corpus's titles and, for captioners, the prompts).
import polars as pl

from iisan.captions import load_prompts
from iisan.pipeline.jobs import job
from iisan.pipeline.rehearsal import build_hub_model

with job(snakemake):
    w, p = snakemake.wildcards, snakemake.params
    texts = pl.read_parquet(snakemake.input.titles)["title"].to_list()
    if w.section == "captioners":
        texts += [q["text"] for q in load_prompts(snakemake.input.prompts).values()]
    build_hub_model(w.section, w.name, p.entry, texts, p.cache, snakemake.output[0])
