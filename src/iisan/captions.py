"""LLaVA-NeXT captions of item images: covers (one image slot) and videos (three frames as three
image slots of ONE prompt), used as text item fields (paper Table IX).

`caption_items` decodes greedily in left-padded batches, longest prompt first (token count with
the image tokens), bf16 on CUDA and fp32 on a CPU; forked workers can read and process the
images ahead of the GPU, the batch size can come from a memory plan (`iisan.caption_bound`),
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
by several shard jobs and merged (`iisan.shards`).

`build_captioner_standin` makes the demo's stand-in: the real architecture
(`LlavaNextForConditionalGeneration`: CLIP vision tower, projector, Mistral or Llama text
model, any-resolution tiling) at a tiny size with random weights; its captions carry no signal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .io import DamagedFileError, atomic_path, honour_umask, read_json, set_aside, write_json, write_parquet

log = logging.getLogger(__name__)

COLUMNS = ("item_id", "caption")

# Stand-in geometry: the real models tile 336 px inputs on the grid below (scaled by 336 / 32).
STANDIN_TILE = 32
STANDIN_PATCH = 8
STANDIN_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
STANDIN_INIT_STD = 0.2  # wider than a trained model's init so that the image visibly steers the random captions

# Chat templates of the stand-ins, after those of the llava-hf checkpoints: Mistral's [INST]
# turns (llava-v1.6-mistral-7b-hf) and the ChatML turns of llava-v1.6-34b-hf (Yi-34B, a Llama
# architecture). Image slots come first in a user turn, then its text, as in the originals.
CHAT_TEMPLATES = {
    "mistral": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}[INST] "
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        " [/INST]"
        "{% elif message['role'] == 'assistant' %} {{ message['content'][0]['text'] }}</s>"
        "{% endif %}{% endfor %}"
    ),
    "llama": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
TURN_TOKENS = {"mistral": ["[INST]", "[/INST]"], "llama": ["<|im_start|>", "<|im_end|>"]}
# Greedy decoding with every setting that a checkpoint's generation_config.json could otherwise
# fill in (transformers takes unset fields from it) pinned to its neutral value.
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0}
# KV caches for decoding: transformers' default (dynamic, grown every step, eager) or a static one
# allocated for prompt + max_new_tokens, whose decode step transformers compiles on CUDA (4-10x
# faster decode on an H200, docs/benchmarks.md). Under the static cache every batch of a job gets
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


class CaptionError(ValueError):
    """A caption set that cannot be used as it is (missing or damaged files)."""


class CaptionMismatch(CaptionError):
    """A sound caption set made under other settings than the expected ones."""


class DamagedCaptions(CaptionError, DamagedFileError):
    """A caption set whose Parquet disagrees with its manifest (rows, columns, size, checksum),
    cannot be read, or lacks items; its Parquet and manifest have been moved aside (the message
    says where and what happens next)."""


# what happens after a caption set was moved aside
RECAPTION = "the next run of the workflow captions the items again (the captions its memo holds are reused, not recomputed)"


# ---------------------------------------------------------------------------------------------
# prompts


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


# ---------------------------------------------------------------------------------------------
# stand-in


def build_captioner_standin(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    seed: int = 0,
    *,
    text_family: str = "mistral",
    vocab_size: int = 2000,
    hidden: int = 64,
    layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
) -> None:
    """Save a random-weight LLaVA-NeXT stand-in to `out_dir` (model, tokenizer, processor with
    `LlavaNextImageProcessorPil`, chat template), loadable offline with ``from_pretrained``.

    The architecture is the real one at a tiny size: a CLIP vision tower on 32 px tiles of
    8 px patches, any-resolution tiling on grid pinpoints up to 96 px, the two-layer projector,
    and a Mistral (GQA, like llava-v1.6-mistral-7b) or Llama (like the Yi-34B of
    llava-v1.6-34b) text model with its chat template. The word-level tokenizer is trained
    offline on `texts` (pass the item titles AND the prompts, or the prompt's words are <unk>),
    plus the special ``<image>`` token and the template's turn tokens. The LM-head rows of all
    special tokens are zero, so the stand-in never emits one: every caption runs to
    ``max_new_tokens`` words of the vocabulary (a random model would otherwise often stop at
    once or emit only image tokens, which decode to nothing)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from .backbones import train_bpe_tokenizer

    if text_family not in CHAT_TEMPLATES:
        raise ValueError(f"text_family {text_family!r}: expected one of {sorted(CHAT_TEMPLATES)}")
    out_dir = Path(out_dir)
    tokenizer = train_bpe_tokenizer(list(texts), vocab_size=vocab_size)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>", *TURN_TOKENS[text_family]]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    text_kwargs = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_config = MistralConfig(**text_kwargs, sliding_window=None) if text_family == "mistral" else LlamaConfig(**text_kwargs)
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=STANDIN_TILE,
        patch_size=STANDIN_PATCH,
        projection_dim=vision_hidden,
    )
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_grid_pinpoints=STANDIN_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(STANDIN_TILE // STANDIN_PATCH) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * STANDIN_INIT_STD)
        model.lm_head.weight[tokenizer.all_special_ids] = 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": STANDIN_TILE},
        crop_size={"height": STANDIN_TILE, "width": STANDIN_TILE},
        image_grid_pinpoints=STANDIN_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=STANDIN_PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATES[text_family],
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    honour_umask(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


# ---------------------------------------------------------------------------------------------
# settings


def compute_dtype(device: str | torch.device | None) -> torch.dtype:
    """bf16 on CUDA (the paper's GPUs), fp32 on a CPU (bf16 matmuls are slow or missing there)."""
    return torch.bfloat16 if _device(device).type == "cuda" else torch.float32


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def caption_settings(
    model_path: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 300,
    device: str | torch.device | None = None,
    revision: str | None = None,
    settings: dict | None = None,
    kv_cache: str = "dynamic",
    attention: str = "sdpa",
) -> dict:
    """Everything that determines a caption set, computed without loading the model: the model
    (path or hub id), its revision, a fingerprint of its files (`iisan.cache.weights_fingerprint`:
    weights, tokenizer, processor and chat template of a local folder; the id and revision of a
    hub model), the prompt's sha256, the decoding settings (with the KV cache and the attention
    when they are not the defaults, dynamic and sdpa: greedy decoding over another cache, padding
    or attention kernel may round differently),
    the compute dtype, and the caller's `settings` (what `images_for` feeds the model: frame
    positions, image source, ...)."""
    from .cache import weights_fingerprint

    if kv_cache not in KV_CACHES:
        raise ValueError(f"captions.kv_cache: {kv_cache!r} is not one of {', '.join(KV_CACHES)}")
    if attention not in ATTENTIONS:
        raise ValueError(f"captions.attention: {attention!r} is not one of {', '.join(ATTENTIONS)}")
    model_path = str(model_path)
    decoding = {**GREEDY, "max_new_tokens": int(max_new_tokens), "stop": "eos+end_of_turn", "padding_side": "left"}
    if kv_cache != "dynamic":  # the default stays out, so caption sets made before the option keep their key
        decoding.update(kv_cache=kv_cache, cache_length_multiple_of=STATIC_BUCKET)
    if attention != "sdpa":
        decoding["attention"] = attention
    computed = {
        "model": model_path,
        "revision": revision,
        "weights": weights_fingerprint(model_path, revision),
        "prompt_sha256": prompt_sha256(prompt),
        "decoding": decoding,
        "dtype": str(compute_dtype(device)).removeprefix("torch."),
    }
    extra = _jsonable(settings or {})
    clash = sorted(set(extra) & set(computed))
    if clash:
        raise ValueError(f"caption settings {clash} are computed by caption_settings; the caller's settings may not set them")
    return {**computed, **extra}


def memo_dir(captions_parquet: str | os.PathLike) -> Path:
    """The memo of a caption set (reusable captions keyed by images and settings): ``<stem>.memo`` beside it."""
    captions_parquet = Path(captions_parquet)
    return captions_parquet.with_name(captions_parquet.stem + ".memo")


def settings_id(key: dict) -> str:
    """The memo folder name of a settings key: the first 16 hex digits of its canonical JSON's sha256."""
    return hashlib.sha256(json.dumps(_jsonable(key), sort_keys=True).encode("utf-8")).hexdigest()[:16]


def manifest_path(out_parquet: str | os.PathLike) -> Path:
    out_parquet = Path(out_parquet)
    return out_parquet.with_name(out_parquet.stem + ".manifest.json")


def _differences(stored: dict, expected: dict, keys: Iterable[str]) -> list[str]:
    def short(v: Any) -> str:
        s = json.dumps(v)
        return s if len(s) <= 80 else s[:77] + "..."

    missing = object()
    out = []
    for k in sorted(keys):
        if stored.get(k, missing) != expected.get(k, missing):
            have = short(stored[k]) if k in stored else "absent"
            want = short(expected[k]) if k in expected else "absent"
            out.append(f"{k} is {have}, expected {want}")
    return out


# ---------------------------------------------------------------------------------------------
# captioning


def _sdpa_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention (`sdpa_attention_forward`), except for a decode step of a
    grouped-query model with a mask: the query (batch, heads, 1, d) becomes (batch, kv_heads,
    heads / kv_heads, d), the query heads of each K/V head as that head's query rows (the
    heads' order of `repeat_kv`), so SDPA reads the cache's K/V heads as stored; the mask
    (batch, 1, 1, length) broadcasts over them. Returns (batch, 1, heads, d), as SDPA's does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, d = query.shape
    if groups == 1 or q_len != 1 or attention_mask is None or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, heads // groups, groups, d), key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(b, 1, heads, value.shape[-1]), None


def attn_implementation(attention: str) -> dict | None:
    """`attn_implementation` for `from_pretrained` that gives the language model `attention`
    (one of ATTENTIONS) and the vision tower SDPA; None for the default "sdpa" (transformers'
    own choice, SDPA everywhere). Registers "sdpa_gqa" with transformers' attention and mask
    interfaces (its masks are SDPA's)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"captions.attention: {attention!r} is not one of {', '.join(ATTENTIONS)}")
    if attention == "sdpa":
        return None
    if attention == "sdpa_gqa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register("sdpa_gqa", _sdpa_gqa_attention)
        AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)
    return {"": "sdpa", "vision_config": "sdpa", "text_config": attention}


def load_captioner(model_path: str, device: str | torch.device | None = None, revision: str | None = None,
                   attention: str = "sdpa"):
    """(model in eval mode, processor with left padding) of a LLaVA-NeXT checkpoint, its language
    model on `attention` (ATTENTIONS). On CUDA the model is bf16 and spread over the job's GPUs
    (`device_map="auto"`: the 34B model needs ~70 GB); on a CPU fp32. A local folder (the
    workflow's fetched model) loads without the hub."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from .backbones import local_only

    dev = _device(device)
    local = local_only(model_path)
    kwargs: dict[str, Any] = {"dtype": compute_dtype(dev), "revision": revision, **local}
    if (impl := attn_implementation(attention)) is not None:
        kwargs["attn_implementation"] = impl
    if dev.type == "cuda":
        kwargs["device_map"] = "auto"
    model = LlavaNextForConditionalGeneration.from_pretrained(model_path, **kwargs)
    model.eval()
    if dev.type != "cuda":
        model.to(dev)
    processor = LlavaNextProcessor.from_pretrained(model_path, revision=revision, **local)
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, processor


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS of the generation config and of the tokenizer, and the end-of-turn tokens the
    tokenizer knows (ChatML's <|im_end|> for llava-v1.6-34b)."""
    ids: set[int] = set()
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def prompt_lengths(processor, rendered: dict[int, str], sizes: Sequence[Sequence[tuple[int, int]]]) -> list[int]:
    """Token count of each item's prompt with its image tokens expanded, from the image sizes
    (height, width) alone: text tokens of the rendered chat, minus each <image> slot, plus the
    features the any-resolution tiling gives each image."""
    text_len = {k: len(processor.tokenizer(t)["input_ids"]) for k, t in rendered.items()}
    out = []
    for s in sizes:
        feats = processor._get_num_multimodal_tokens(image_sizes=[list(hw) for hw in s]).num_image_tokens
        out.append(text_len[len(s)] - len(s) + sum(feats))
    return out


def static_cache_length(longest_prompt: int, max_new_tokens: int) -> int:
    """Length of a job's static KV cache: its longest prompt plus `max_new_tokens`, rounded up to a
    multiple of STATIC_BUCKET (jobs of similar prompts share a compiled shape)."""
    return -(-(longest_prompt + max_new_tokens) // STATIC_BUCKET) * STATIC_BUCKET


def _encode(processor, texts: list[str], images: list, dtype: torch.dtype) -> dict:
    """The model inputs of one batch on the CPU, left-padded to its longest prompt (images
    flattened in prompt order), pixel values in the model's `dtype` (the cast rounds as it does
    on a GPU)."""
    enc = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


def _caption_batch(model, processor, texts: list[str], images: list | None, generation_config, *,
                   encoded: dict | None = None) -> tuple[list[str], list[bool]]:
    """Captions of one left-padded batch (images flattened in prompt order; or its inputs
    `encoded` ahead by `_encode`, `images` then unused) and whether each stopped on a stop token
    (False: cut at max_new_tokens)."""
    enc = encoded if encoded is not None else _encode(processor, texts, images, model.dtype)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=generation_config)
    new = out[:, enc["input_ids"].shape[1]:].cpu()
    stops = torch.tensor(generation_config.eos_token_id)
    stopped = torch.isin(new, stops).any(dim=1).tolist()
    captions = [c.strip() for c in processor.batch_decode(new, skip_special_tokens=True)]
    return captions, stopped


class _Prepared(torch.utils.data.Dataset):
    """Batch k's (k, texts, model inputs): `images_for` and the processor, run in a DataLoader
    worker while the GPU captions earlier batches."""

    def __init__(self, batches, inputs, processor, dtype):
        self.batches, self.inputs, self.processor, self.dtype = batches, inputs, processor, dtype

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        texts, images = self.inputs(self.batches[k])
        return k, texts, _encode(self.processor, texts, images, self.dtype)


class _Sizes(torch.utils.data.Dataset):
    def __init__(self, chunks, images_for):
        self.chunks, self.images_for = chunks, images_for

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, k):
        return [_image_sizes(i, self.images_for(i)) for i in self.chunks[k]]


def _image_sizes(item_id, imgs) -> list[tuple[int, int]]:
    if not imgs:
        raise ValueError(f"item {item_id!r}: images_for gave no image")
    return [(im.height, im.width) for im in imgs]


def _loader(dataset, workers: int):
    """`dataset`'s entries in order, `workers` forked processes computing ahead (two entries
    each); in this process when `workers` is 0 or fork is unavailable. Forked, because
    `images_for` is usually a closure (not picklable); the workers use no GPU."""
    import multiprocessing

    if workers and "fork" not in multiprocessing.get_all_start_methods():
        log.warning("captions.workers %d: this platform cannot fork; images are prepared in the main process", workers)
        workers = 0
    if not workers:
        return (dataset[k] for k in range(len(dataset)))
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=2,
                                       multiprocessing_context="fork")


def auto_batch_size(model, longest_prompt: int, max_new_tokens: int, items: int) -> int:
    """The largest batch whose KV cache (the longest prompt + max_new_tokens) and prefill
    activations fit the free memory of the model's GPUs (`iisan.caption_bound.largest_batch`),
    at most `items`; AUTO_BATCH_CPU on a CPU."""
    from .caption_bound import largest_batch, shapes_from_config

    if model.device.type != "cuda":
        return max(1, min(AUTO_BATCH_CPU, items))
    cards = set()
    for d in getattr(model, "hf_device_map", {}).values():  # GPU indices, "cuda:k", "cpu" or "disk"
        if isinstance(d, int) or str(d).startswith("cuda"):
            cards.add(d if isinstance(d, int) else torch.device(d).index or 0)
    free = sum(torch.cuda.mem_get_info(k)[0] for k in cards or {model.device.index or 0})
    elem = torch.finfo(model.dtype).bits // 8
    return largest_batch(shapes_from_config(model.config), prompt_tokens=longest_prompt, new_tokens=max_new_tokens, memory=free,
                         elem=elem, weights=False, cap=items)


def _plain_id(item_id: Any) -> Any:
    """An item id as JSON and Parquet hold it (numpy scalars become Python ones)."""
    return item_id.item() if hasattr(item_id, "item") else item_id


def images_sha256(digests: Iterable[str]) -> str:
    """The key of one item's images: the sha256 of the digests of its images, in prompt order."""
    return hashlib.sha256("\n".join(digests).encode("utf-8")).hexdigest()


def pixels_sha256(images: Sequence) -> str:
    """The key of PIL images by their pixels (mode, size and bytes of each)."""
    return images_sha256(hashlib.sha256(f"{im.mode} {im.width}x{im.height}".encode() + im.tobytes()).hexdigest() for im in images)


def _memo_records(path: Path) -> list[dict]:
    """The records of one memo file; a torn last line (a crash mid-append, or a job still
    appending) is dropped; a file with any other unreadable line is not used (logged)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line)
            out.append({"item_id": rec["item_id"], "images": str(rec["images"]), "caption": str(rec["caption"]),
                        "stopped": bool(rec["stopped"])})
        except (ValueError, KeyError, TypeError) as err:
            if n == len(lines) - 1:
                log.warning("%s: dropping a torn last record (%s)", path, err)
                break
            log.warning("not reusing the captions of %s: record %d is unreadable (%s)", path, n + 1, err)
            return []
    return out


def _read_memo(memo: Path, key: dict) -> dict[str, tuple[str, bool]]:
    """{images key: (caption, stopped)} of every record file of `memo` under settings `key`;
    folders of other settings are left out, each with a log line naming the differences."""
    if not memo.is_dir():
        return {}
    here = memo / settings_id(key)
    for other in sorted(p for p in memo.iterdir() if p.is_dir() and p != here):
        try:
            old = read_json(other / "settings.json")
            differ = "; ".join(_differences(old, key, set(old) | set(key))) if isinstance(old, dict) else "unreadable settings"
        except (OSError, ValueError) as err:
            differ = f"its settings are unreadable ({err})"
        log.warning("not reusing the captions in %s: made under other settings (%s)", other, differ)
    done: dict[str, tuple[str, bool]] = {}
    if here.is_dir():
        for path in sorted(here.glob("*.jsonl")):
            done.update((r["images"], (r["caption"], r["stopped"])) for r in _memo_records(path))
    return done


def prune_memo(memo: str | os.PathLike, key: dict, writers: Iterable[str]) -> None:
    """Keep only the record files of `writers` (the jobs that wrote the caption set) under
    settings `key` in the memo: records of other jobs and folders of other settings are removed."""
    memo = Path(memo)
    if not memo.is_dir():
        return
    here, keep = memo / settings_id(key), {f"{w}.jsonl" for w in writers}
    for folder in memo.iterdir():
        if folder.is_dir() and folder != here:
            shutil.rmtree(folder)
    for path in here.glob("*.jsonl"):
        if path.name not in keep:
            path.unlink()


def batch_too_large(model, batch_size: int, longest_prompt: int, max_new_tokens: int) -> str | None:
    """Why `batch_size` exceeds the memory plan of the free GPU memory (`auto_batch_size`), or None."""
    try:
        fits = auto_batch_size(model, longest_prompt, max_new_tokens, batch_size)
    except ValueError as err:
        return str(err)
    return f"the memory plan fits {fits}" if fits < batch_size else None


def caption_items(
    model_path: str | os.PathLike,
    item_ids: Sequence,
    images_for: Callable[[Any], list],
    prompt: str,
    out_parquet: str | os.PathLike,
    *,
    batch_size: int | str,
    max_new_tokens: int = 300,
    device: str | torch.device | None = None,
    settings: dict,
    revision: str | None = None,
    progress: bool | None = None,
    kv_cache: str = "dynamic",
    image_key: Callable[[Any], str] | None = None,
    memo: str | os.PathLike | None = None,
    attention: str = "sdpa",
    workers: int = 0,
) -> dict:
    """Caption every item of `item_ids` with LLaVA-NeXT and write ``out_parquet`` (``item_id``,
    ``caption``, in the order of `item_ids`) and its manifest; returns the manifest.

    ``images_for(item_id)`` gives the item's PIL images: one cover, or a video's frames in
    chronological order, which fill that many image slots of one prompt; it is called twice per
    item to caption (image sizes for the batch order, then the batch). `settings` names what
    `images_for` does (frame positions, image source) and joins the settings key. Decoding is
    greedy; batches are left-padded and taken longest prompt first; `kv_cache` is one of
    `KV_CACHES`, `attention` one of `ATTENTIONS`. `batch_size` "auto" takes the largest batch
    that the free GPU memory holds (`auto_batch_size`). With `workers` > 0, that many forked
    processes call `images_for` and the processor ahead of the GPU (batch i+1 and later while
    batch i generates; the captions are the same).

    Captions are reused by content (module docstring): ``image_key(item_id)`` is the key of an
    item's images (default: `pixels_sha256` of ``images_for(item_id)``; `images_sha256` of the
    image files' sha256s is cheaper). `memo` is the memo folder; by default ``out_parquet``'s
    own (`memo_dir`), which is pruned to this call's items at the end. A shard job passes the
    memo of its whole caption set, which the merge prunes (`merge_captions`)."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    out_parquet = Path(out_parquet)
    model_path = str(model_path)
    ids = [_plain_id(i) for i in item_ids]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"item ids repeat (e.g. {dup!r})")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"captions.batch_size is {batch_size!r}, expected a positive integer or 'auto'")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"captions.workers is {workers!r}, expected a non-negative integer")
    dev = _device(device)
    if not Path(model_path).is_dir() and revision is None:
        log.warning("captioning with hub model %s without a pinned revision: the settings cannot tell its versions apart", model_path)
    key = caption_settings(model_path, prompt, max_new_tokens=max_new_tokens, device=dev, revision=revision, settings=settings,
                           kv_cache=kv_cache, attention=attention)
    static = kv_cache == "static"
    memo_folder = memo_dir(out_parquet) if memo is None else Path(memo)
    here = memo_folder / settings_id(key)
    own = here / f"{out_parquet.stem}.jsonl"
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    here.mkdir(parents=True, exist_ok=True)
    if not (here / "settings.json").is_file():
        write_json(here / "settings.json", key)

    keys = {i: image_key(i) if image_key else pixels_sha256(images_for(i)) for i in ids}
    known = _read_memo(memo_folder, key)
    done = {i: known[keys[i]] for i in ids if keys[i] in known}
    if done:
        log.info("%s: %d of %d items captioned already (same images and settings, in %s)", out_parquet, len(done), len(ids), here)
    # this job's record file starts with the records it reuses (a torn line of its own is dropped)
    with atomic_path(own, ".jsonl") as tmp:
        tmp.write_text("".join(_record(i, keys[i], *done[i]) for i in ids if i in done), encoding="utf-8")

    todo = [i for i in ids if i not in done]
    if todo:
        model, processor = load_captioner(model_path, dev, revision, attention)
        chunks = [todo[s:s + 64] for s in range(0, len(todo), 64)]
        sizes = [hw for chunk in _loader(_Sizes(chunks, images_for), workers) for hw in chunk]
        rendered = {k: processor.apply_chat_template(conversation(prompt, k), add_generation_prompt=True)
                    for k in sorted({len(s) for s in sizes})}
        lengths = prompt_lengths(processor, rendered, sizes)
        order = sorted(range(len(todo)), key=lambda j: (-lengths[j], j))
        longest = max(lengths)
        cache_length = static_cache_length(longest, max_new_tokens) if static else None
        generation_config = GenerationConfig(
            **GREEDY, max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(model, processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id,
            **({"cache_implementation": "static", "max_cache_len": cache_length} if static else {}),
        )
        padded = cache_length - max_new_tokens if static else longest  # the memory plan's prompt: the cache less the new tokens
        if batch_size == "auto":
            batch_size = auto_batch_size(model, padded, max_new_tokens, len(todo))
            log.info("captions.batch_size auto: %d (longest prompt %d tokens, %d new)", batch_size, longest, max_new_tokens)
        elif dev.type == "cuda" and (why := batch_too_large(model, batch_size, padded, max_new_tokens)):
            log.warning("captions.batch_size %d may not fit: %s (longest prompt %d tokens, %d new; batch_size auto takes the plan)",
                        batch_size, why, longest, max_new_tokens)
        batches = [[todo[j] for j in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]

        def inputs(batch):
            """(texts, images) of a batch; a short last batch is filled with its last item under
            the static cache (its shapes stay few)."""
            images, texts = [], []
            for i in batch + batch[-1:] * (batch_size - len(batch) if static else 0):
                imgs = images_for(i)
                images.extend(imgs)
                texts.append(rendered[len(imgs)])
            return texts, images

        if workers:
            prepared = ((batches[k], texts, None, enc) for k, texts, enc in
                        _loader(_Prepared(batches, inputs, processor, model.dtype), workers))
        else:  # images read just before their batch
            prepared = ((batch, *inputs(batch), None) for batch in batches)
        with open(own, "a", encoding="utf-8") as fh:
            for batch, texts, images, enc in tqdm(prepared, total=len(batches), desc=f"captions {out_parquet.name}",
                                                  disable=None if progress is None else not progress):
                ahead = {} if enc is None else {"encoded": enc}
                captions, stopped = _caption_batch(model, processor, texts, images, generation_config, **ahead)
                fh.write("".join(_record(i, keys[i], c, s) for i, c, s in zip(batch, captions, stopped)))
                fh.flush()
                os.fsync(fh.fileno())
                done.update({i: (c, s) for i, c, s in zip(batch, captions, stopped)})

    manifest = _write_caption_set(
        out_parquet, ids, [done[i][0] for i in ids], settings=key,
        truncated=sum(not done[i][1] for i in ids),  # cut at max_new_tokens
        empty=sum(not done[i][0] for i in ids), batch_size=batch_size, device=str(dev), library_version=__version__,
    )
    if memo is None:
        prune_memo(memo_folder, key, [out_parquet.stem])
    if manifest["truncated"]:
        log.info("%s: %d of %d captions reached max_new_tokens=%d", out_parquet, manifest["truncated"], len(ids), max_new_tokens)
    return manifest


def _write_caption_set(out_parquet: Path, ids: list, texts: list[str], *, settings: dict, truncated: int, empty: int,
                       batch_size: int | str, device: Any, library_version: str, **extra) -> dict:
    """Write a caption set: the Parquet (``item_id``, ``caption``: `ids` and `texts` in order),
    then its manifest (the given fields, the item count, columns, the Parquet's bytes and
    checksum, and `extra`), which it returns. The old manifest is removed first: a stale one must
    not vouch for the new Parquet."""
    import polars as pl

    from .cache_files import file_checksum

    manifest_file = manifest_path(out_parquet)
    manifest_file.unlink(missing_ok=True)
    write_parquet(pl.DataFrame({"item_id": ids, "caption": texts}), out_parquet)
    manifest = {
        "settings": settings, "items": len(ids), "columns": list(COLUMNS), "truncated": truncated, "empty": empty,
        "batch_size": batch_size, "device": device, "library_version": library_version,
        "bytes": out_parquet.stat().st_size, "checksum": file_checksum(out_parquet), **extra,
    }
    write_json(manifest_file, manifest)
    return manifest


def _record(item_id: Any, images: str, caption: str, stopped: bool) -> str:
    return json.dumps({"item_id": item_id, "images": images, "caption": caption, "stopped": stopped}, ensure_ascii=False) + "\n"


def set_caption_set_aside(out_parquet: str | os.PathLike, reason: str) -> list[Path]:
    """Move a caption set's Parquet and manifest aside (``<name>.damaged-<UTC time>``; nothing is
    deleted, and its memo stays) so that the workflow makes it again; returns their new paths."""
    out_parquet = Path(out_parquet)
    return [set_aside(f, reason) for f in (out_parquet, manifest_path(out_parquet)) if f.is_file()]


def _damaged(out_parquet: Path, why: str) -> DamagedCaptions:
    """Move the caption set aside and return the error that names it, why and what happens next."""
    moved = set_caption_set_aside(out_parquet, why)
    where = ", ".join(str(p) for p in moved) or "nothing to move"
    return DamagedCaptions(f"{out_parquet}: {why}; moved aside to {where}; {RECAPTION}")


def read_caption_set(out_parquet: str | os.PathLike):
    """(caption table, manifest) of the caption set `out_parquet`, the Parquet checked against
    its manifest (``<stem>.manifest.json``): readable, the columns ``item_id``, ``caption``, as
    many rows as the manifest's ``items``, its size and checksum. A caption set that fails is
    damaged: its Parquet and manifest are moved aside (`set_caption_set_aside`) and
    `DamagedCaptions` names the file, the failure and the new names; the workflow's next run makes
    it again from its memo. A missing Parquet raises `CaptionError`."""
    import polars as pl

    from .cache_files import file_checksum

    out_parquet = Path(out_parquet)
    mpath = manifest_path(out_parquet)
    if not out_parquet.is_file():
        raise CaptionError(f"{out_parquet}: missing" + (f" ({mpath.name} describes it)" if mpath.is_file() else "")
                           + "; the workflow's caption rule makes it")
    if not mpath.is_file():
        raise _damaged(out_parquet, f"no manifest {mpath.name} beside it (nothing vouches for its content)")
    try:
        m = read_json(mpath)
    except ValueError as err:
        raise _damaged(out_parquet, f"its manifest {mpath.name} is not valid JSON ({err})") from None
    if not isinstance(m, dict) or not isinstance(m.get("settings"), dict):
        raise _damaged(out_parquet, f"its manifest {mpath.name} has no `settings` object")
    try:
        frame = pl.read_parquet(out_parquet)
    except Exception as err:  # polars raises several kinds on a damaged file
        if isinstance(err, MemoryError):
            raise
        raise _damaged(out_parquet, f"unreadable ({type(err).__name__}: {err})") from err
    if tuple(frame.columns) != COLUMNS or frame.height != m.get("items"):
        raise _damaged(out_parquet, f"columns {frame.columns} and {frame.height} rows, but its manifest {mpath.name} says "
                                    f"{list(COLUMNS)} and {m.get('items')} items")
    if out_parquet.stat().st_size != m.get("bytes") or file_checksum(out_parquet) != m.get("checksum"):
        raise _damaged(out_parquet, f"its content does not match the size and checksum in its manifest {mpath.name} "
                                    "(replaced or damaged)")
    return frame, m


def load_captions(out_parquet: str | os.PathLike, expected_settings: dict):
    """The caption table (``item_id``, ``caption``) of `out_parquet` after checking it against
    its manifest (`read_caption_set`: a damaged caption set is moved aside) and every key of
    `expected_settings` (usually `caption_settings(...)`; a key it leaves out is not checked,
    e.g. ``dtype`` when the reader runs elsewhere). Raises `CaptionMismatch` naming each
    setting that differs (the caption set stays: it is sound)."""
    frame, m = read_caption_set(out_parquet)
    expected = _jsonable(expected_settings)
    differ = _differences(m["settings"], expected, expected.keys())
    if differ:
        raise CaptionMismatch(f"captions {out_parquet} were made under other settings: " + "; ".join(differ))
    return frame


def caption_texts(out_parquet: str | os.PathLike, item_ids: Sequence, items_parquet: str | os.PathLike | None = None) -> list[str]:
    """The caption of every item of `item_ids`, in that order, from the caption set `out_parquet`
    (`read_caption_set`; a Parquet without a manifest is read unchecked, with a warning). A
    caption set that is damaged, or lacks a caption for any of the items (made for other items,
    or cut short), is moved aside and named in the error: the workflow's next run makes it again,
    taking the captions its memo holds."""
    import polars as pl

    from .io import read_or_set_aside

    out_parquet = Path(out_parquet)
    if manifest_path(out_parquet).is_file() or not out_parquet.is_file():
        frame, _ = read_caption_set(out_parquet)
    else:
        log.warning("%s: no manifest %s beside it; its rows are not checked against one", out_parquet,
                    manifest_path(out_parquet).name)
        frame = read_or_set_aside(out_parquet, lambda p: pl.read_parquet(p).select(COLUMNS), RECAPTION)
    captions = dict(zip(frame["item_id"].to_list(), frame["caption"].to_list()))
    ids = [_plain_id(i) for i in item_ids]
    missing = [i for i in ids if i not in captions]
    if missing:
        of = f" of {items_parquet}" if items_parquet is not None else ""
        raise _damaged(out_parquet, f"no caption for {len(missing)} of the {len(ids)} items{of} (first: {missing[0]!r}; "
                                    f"it holds {frame.height} rows)")
    return [captions[i] for i in ids]


# ---------------------------------------------------------------------------------------------
# the workflow's caption job


def _zip_images(archive: Path, members: list[str | None], blank: int = 32, item=None, dataset: str | None = None,
                advice: str | None = None) -> list:
    """RGB images of zip `members` (item `item`'s) at their own size (a black square for None);
    one that does not decode raises `iisan.images.UndecodableImage` naming the archive, the
    member, the item and `advice` (by default the config key that blanks a cover)."""
    from PIL import Image

    from .images import open_image

    with zipfile.ZipFile(archive) as zf:
        out = []
        for m in members:
            if m is None:
                out.append(Image.new("RGB", (blank, blank)))
            else:
                out.append(open_image(zf, m, archive, item, dataset, advice))
        return out


def zip_images_sha256(archive: Path, members: dict[Any, list[str | None]]) -> dict[Any, str]:
    """{item: `images_sha256` of the sha256s of its zip members' bytes ("black" for None)}, the
    archive opened once."""
    with zipfile.ZipFile(archive) as zf:
        return {item: images_sha256("black" if m is None else hashlib.sha256(zf.read(m)).hexdigest() for m in names)
                for item, names in members.items()}


def caption_dataset(items_parquet: Path, source: str, images_archive: Path, model_path: str, prompts_file: Path,
                    out_parquet: Path, *, positions: Sequence[float] = (), batch_size: int | str = 8, max_new_tokens: int = 300,
                    device: str | None = None, revision: str | None = None, kv_cache: str = "dynamic",
                    attention: str = "sdpa", workers: int = 0, shard: tuple[int, int] = (1, 1), memo: Path | None = None) -> dict:
    """Caption every item of a preprocessed dataset: `source` "cover" reads each item's cover from
    the dataset's image archive (items.parquet's `image` member; an item without one gets a black
    image), "video" its frames from the frames archive (``<item_id>_<k>.jpg``, k over
    `positions`; an item whose video was skipped gets black frames). The prompt is the
    `source` entry of `prompts_file`; the settings record the source and the frame positions.
    `shard` (k, n) captions shard k of n only (`iisan.shards.shard_items`) into the memo `memo`
    of the whole caption set (`caption_items`). Captions are reused by the sha256 of the
    members' bytes."""
    import polars as pl

    from .shards import shard_items

    prompt = load_prompts(prompts_file)[source]
    items = pl.read_parquet(items_parquet)
    ids = shard_items([_plain_id(i) for i in items["item_id"].to_list()], *shard)
    if source == "cover":
        covers = dict(zip(items["item_id"].to_list(), items["image"].to_list()))
        members = {i: [covers[i]] for i in ids}
    elif source == "video":
        from .frames import read_frames

        present = read_frames(images_archive)
        n = len(positions)
        if n != prompt["images"]:
            raise ValueError(f"{prompts_file}: the video prompt has {prompt['images']} image slots, the frames are {n} per video")
        members = {i: [m if m in present else None for m in (f"{i}_{k}.jpg" for k in range(n))] for i in ids}
    else:
        raise ValueError(f"unknown caption source {source!r} (cover, video)")

    # the dataset's folder (resources/<dataset>) is named after its dataset_sources entry
    dataset = Path(items_parquet).parent.name
    advice = None if source == "cover" else (f"{images_archive} is the frames job's output: move it aside and rerun the "
                                              "workflow to extract the frames again")

    def images_for(item_id):
        return _zip_images(images_archive, members[item_id], item=item_id, dataset=dataset, advice=advice)

    keys = zip_images_sha256(images_archive, members)
    settings = {"source": source, "frame_positions": list(positions) if source == "video" else None}
    return caption_items(model_path, ids, images_for, prompt["text"], out_parquet, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, device=device, settings=settings, revision=revision, kv_cache=kv_cache,
                         attention=attention, workers=workers, image_key=keys.__getitem__, memo=memo)


def merge_captions(item_ids: Sequence, shard_parquets: Sequence[str | os.PathLike], out_parquet: str | os.PathLike) -> dict:
    """Write the caption set `out_parquet` of `item_ids` (in that order) from its shards' Parquets,
    each checked against its manifest; every shard must hold exactly its items
    (`iisan.shards.shard_items`, in the order of `shard_parquets`) under the same settings. Returns the
    manifest, which is the one a single job would write plus ``shards``; then prunes the caption
    set's memo to the shards' records."""
    from .shards import shard_items

    out_parquet = Path(out_parquet)
    ids = [_plain_id(i) for i in item_ids]
    n = len(shard_parquets)
    captions: dict = {}
    manifests = []
    for k, path in enumerate(shard_parquets, start=1):
        path = Path(path)
        frame = load_captions(path, {})
        m = read_json(manifest_path(path))
        if manifests and m["settings"] != manifests[0]["settings"]:
            differ = _differences(m["settings"], manifests[0]["settings"], set(m["settings"]) | set(manifests[0]["settings"]))
            raise CaptionMismatch(f"caption shard {path} was made under other settings than {shard_parquets[0]}: " + "; ".join(differ))
        want = shard_items(ids, k, n)
        got = frame["item_id"].to_list()
        if got != want:
            lost, extra = sorted(set(want) - set(got), key=str), sorted(set(got) - set(want), key=str)
            raise CaptionError(f"caption shard {path} ({k} of {n}) does not hold its items: missing {lost[:5]}, "
                               f"not its own {extra[:5]}; rerun it")
        captions.update(zip(got, frame["caption"].to_list()))
        manifests.append(m)
    first = manifests[0]
    devices = sorted({m["device"] for m in manifests})
    manifest = _write_caption_set(
        out_parquet, ids, [captions[i] for i in ids], settings=first["settings"], truncated=sum(m["truncated"] for m in manifests),
        empty=sum(m["empty"] for m in manifests), batch_size=first["batch_size"], device=devices[0] if len(devices) == 1 else devices,
        library_version=first["library_version"], shards=n,
    )
    prune_memo(memo_dir(out_parquet), first["settings"], [Path(p).stem for p in shard_parquets])
    return manifest
