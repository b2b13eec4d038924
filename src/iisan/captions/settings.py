"""How captions are decoded: greedy settings, the KV caches and attentions a caption job can
use (`KV_CACHES`, `ATTENTIONS`), the prompts file, and `CaptionSettings`, the caption stage's
settings as one validated object."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Greedy decoding with every setting that a checkpoint's generation_config.json could otherwise
# fill in (transformers takes unset fields from it) pinned to its neutral value.
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0}
# KV caches for decoding: transformers' default (dynamic, grown every step, eager) or a static one
# allocated for prompt + max_new_tokens, whose decode step transformers compiles on CUDA (4-10x
# faster decode on an H200, docs/benchmarks-history.md). Under the static cache every batch of a job gets
# one cache, as long as the job's longest prompt plus max_new_tokens rounded up to a multiple of
# STATIC_BUCKET tokens (`static_cache_length`), and the last batch is filled up to the batch size,
# so a job compiles its decode step for one shape. Prompts are padded only to their batch's
# longest: a batch of equal lengths (sorted by length, most are) then has no padding mask, and
# its prefill takes SDPA's causal flash kernel over the empty cache instead of a masked one.
KV_CACHES = ("dynamic", "static")
STATIC_BUCKET = 128
# Attention of the language model (captions.attention; the vision tower keeps SDPA):
# "sdpa", transformers' SDPA, which hands a grouped-query model's K and V to SDPA expanded to the
# query heads when a padding mask is given (in compiled decoding always: the cache is copied and
# read heads/kv_heads times per step); "sdpa_gqa", the same SDPA except that a decode step's one
# query token per sequence attends on the K/V heads as stored, its query heads grouped per K/V
# head (`_sdpa_gqa_attention`: the cache is read once, in place); "flex_attention",
# transformers' FlexAttention (native GQA; blocks of the cache that the mask hides, beyond the
# live length or padding, are skipped).
ATTENTIONS = ("sdpa", "sdpa_gqa", "flex_attention")
AUTO_BATCH_CPU = 8  # batch_size "auto" on a CPU (the memory plan is for GPUs)
# end-of-turn tokens that stop a caption besides the tokenizer's and generation config's EOS
END_OF_TURN = ("<|im_end|>", "<|eot_id|>")


def load_prompts(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The prompt entries of `path` (config/prompts/captions.yaml), checked: each has a
    non-empty `text` and a positive `images` count."""
    import yaml

    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a mapping of prompt names to entries")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or not entry["text"].strip():
            raise ValueError(f"{path}: prompt {name!r} needs a non-empty `text`")
        if not isinstance(entry.get("images"), int) or entry["images"] < 1:
            raise ValueError(f"{path}: prompt {name!r} needs `images`, a positive image-slot count")
    return entries


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def conversation(prompt: str, n_images: int) -> list[dict]:
    """One user turn: `n_images` image slots (a video's frames in chronological order), then the prompt."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]


@dataclass(frozen=True)
class CaptionSettings:
    """The caption stage's settings (config `captions`, less the captioner names and the prompts
    file): one validated object. Its defaults are the config schema's (`iisan.pipeline.workflow.from_code`
    takes them from here), so a config that leaves a key out and a caller that leaves an argument
    out get the same value."""

    max_new_tokens: int = 300  # tokens a caption may have
    batch_size: int | str = 8  # items per batch, or "auto" (the memory plan, iisan.captions.caption_bound; AUTO_BATCH_CPU on a CPU)
    kv_cache: str = "dynamic"  # one of KV_CACHES
    attention: str = "sdpa"  # one of ATTENTIONS
    workers: int = 2  # forked processes that read and prepare the images ahead of the GPU (0: in series)
    frames: tuple[float, ...] = (0.1, 0.5, 0.9)  # where in a video its frames are taken (fractions of its length)

    def __post_init__(self):
        object.__setattr__(self, "frames", tuple(self.frames))
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"captions.kv_cache: {self.kv_cache!r} is not one of {', '.join(KV_CACHES)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"captions.attention: {self.attention!r} is not one of {', '.join(ATTENTIONS)}")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1)):
            raise ValueError(f"captions.batch_size: {self.batch_size!r} is neither a positive integer nor auto")
        for key in ("max_new_tokens", "workers"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "max_new_tokens" else 0):
                raise ValueError(f"captions.{key}: {v!r} is not a {'positive' if key == 'max_new_tokens' else 'non-negative'} integer")
        if not self.frames or not all(0 <= f <= 1 for f in self.frames):
            raise ValueError(f"captions.frames: {list(self.frames)!r} are not fractions of a video's length between 0 and 1")

    @classmethod
    def from_config(cls, section: dict) -> CaptionSettings:
        """The settings of a config's `captions` section (its other keys, the captioners and the
        prompts file, are the workflow's)."""
        return cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})

    @classmethod
    def defaults(cls) -> dict:
        """{key: default} of every setting, as the config schema gives them."""
        return {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default) for f in fields(cls)}

    def to_dict(self) -> dict:
        return {f.name: (list(getattr(self, f.name)) if f.name == "frames" else getattr(self, f.name)) for f in fields(self)}


SOURCES = ("cover", "video")  # what a caption set captions: an item's cover, or its video's frames


@dataclass(frozen=True)
class CaptionJob:
    """One caption job: what it captions (`source`, one of SOURCES), which shard of the caption
    set (k, n), with which captioner (a hub id or a folder, its `revision`) and `settings`, and
    the caption set it belongs to (`caption_set`: the whole set's Parquet, whose memo its shards
    share). The workflow's caption rule passes it as its one param; its files are the rule's
    input and output."""

    source: str
    captioner: str
    caption_set: str
    settings: CaptionSettings = CaptionSettings()
    revision: str | None = None
    shard: tuple[int, int] = (1, 1)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"unknown caption source {self.source!r} ({', '.join(SOURCES)})")
        object.__setattr__(self, "shard", tuple(int(x) for x in self.shard))
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", CaptionSettings(**self.settings))

    @property
    def sharded(self) -> bool:
        return self.shard[1] > 1

    def to_dict(self) -> dict:
        return {"source": self.source, "captioner": self.captioner, "caption_set": self.caption_set,
                "settings": self.settings.to_dict(), "revision": self.revision, "shard": list(self.shard)}

    @classmethod
    def from_dict(cls, d: dict) -> CaptionJob:
        return cls(**d)
