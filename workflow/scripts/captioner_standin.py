# A random-weight LLaVA-NeXT stand-in (tokenizer trained on the titles and the prompts).
import zlib
from pathlib import Path

import polars as pl

from iisan.captions import build_captioner_standin, load_prompts
from iisan.pipeline.jobs import job

with job(snakemake):
    name, spec = snakemake.wildcards.captioner, snakemake.params.spec
    texts = pl.read_parquet(snakemake.input.titles)["title"].to_list()
    texts += [p["text"] for p in load_prompts(snakemake.input.prompts).values()]
    build_captioner_standin(Path(snakemake.output[0]).parent, texts, seed=zlib.crc32(name.encode()) % 2**31,
                            text_family=spec.get("text_family", "mistral"))
