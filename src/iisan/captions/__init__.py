"""LLaVA-NeXT captions of item images: covers (one image slot) and videos (three frames as three
image slots of ONE prompt), used as text item fields (paper Table IX).

`caption_items` decodes greedily in left-padded batches, longest prompt first (token count with
the image tokens), bf16 on CUDA and fp32 on a CPU; forked workers can read and process the
images ahead of the GPU, the batch size can come from a memory plan (`iisan.captions.caption_bound`),
and the language model's attention is selectable (`ATTENTIONS`). It reuses captions by content: a caption
set's memo (``<stem>.memo/`` beside its Parquet, `memo_dir`) holds, in one folder per settings
key (model, revision or weights fingerprint, prompt sha256, decoding settings, the caller's input
settings such as frame positions), records of captioned items keyed by the sha256 of their
images; every finished batch is appended to the job's own record file there. A rerun, or a job
whose inputs changed, captions only the items whose images under these settings no record holds
(an interrupted run resumes, a replaced video recaptions its item alone); records under other
settings are not used (logged, naming the differences) and are pruned when the caption set is
written. The Parquet (``item_id``, ``caption``) is written atomically, then
``<stem>.manifest.json`` with the settings, the item count and the Parquet's checksum. Readers
check the Parquet against its manifest (`read_caption_set`; `caption_texts`, which the item
fields read, also that every item has a caption): a caption set that fails is damaged, moved
aside with its manifest (``<name>.damaged-<UTC time>``) and named in the error, so that the
workflow's next run makes it again, from its memo. `load_captions` also refuses a caption set
whose settings differ from the expected ones, naming each difference. A caption set may be made
by several shard jobs and merged (`iisan.captions.shards`).

The modules: `settings` (the options, `CaptionSettings` and `CaptionJob`), `files` (caption sets
and their memo on disk, read without torch), `llava` (the model and `caption_items`), `dataset`
(`caption_dataset`, `merge_captions`), `standin` (the demo's captioner).

`build_captioner_standin` makes the demo's stand-in: the real architecture
(`LlavaNextForConditionalGeneration`: CLIP vision tower, projector, Mistral or Llama text
model, any-resolution tiling) at a tiny size with random weights; its captions carry no signal.
"""

import importlib

# where each public name lives; the package imports a module when one of its names is first asked
# for, so that planning (the settings) and reading caption sets (files) never import torch
_MODULES = {
    "dataset": ("caption_dataset", "merge_captions", "zip_images_sha256"),
    "files": ("COLUMNS", "RECAPTION", "CaptionError", "CaptionMismatch", "DamagedCaptions", "caption_texts", "images_sha256",
              "load_captions", "manifest_path", "memo_dir", "pixels_sha256", "prune_memo", "read_caption_set",
              "set_caption_set_aside", "settings_id"),
    "llava": ("attn_implementation", "auto_batch_size", "batch_too_large", "caption_items", "caption_settings", "compute_dtype",
              "load_captioner", "prompt_lengths", "static_cache_length", "stop_token_ids"),
    "settings": ("ATTENTIONS", "AUTO_BATCH_CPU", "END_OF_TURN", "GREEDY", "KV_CACHES", "SOURCES", "STATIC_BUCKET", "CaptionJob",
                 "CaptionSettings", "conversation", "load_prompts", "prompt_sha256"),
    "standin": ("CHAT_TEMPLATES", "TURN_TOKENS", "build_captioner_standin"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_HOME)
