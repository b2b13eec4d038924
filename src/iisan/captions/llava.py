"""Captioning with a LLaVA-NeXT model (`caption_items`): the settings key of a caption set
(`caption_settings`), loading the model, batches decoded greedily longest prompt first, the
memory plan's batch size, and the memo that makes a job resumable."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from iisan import __version__
from iisan.captions.files import jsonable, memo_dir, memo_record, pixels_sha256, plain_id, prune_memo, read_memo, settings_id, write_caption_set
from iisan.captions.settings import (
    ATTENTIONS,
    AUTO_BATCH_CPU,
    END_OF_TURN,
    GREEDY,
    KV_CACHES,
    STATIC_BUCKET,
    CaptionSettings,
    conversation,
    prompt_sha256,
)
from iisan.io import atomic_path, write_json

DEFAULTS = CaptionSettings()  # the defaults of the settings a caller leaves out

log = logging.getLogger("iisan.captions")


def compute_dtype(device: str | torch.device | None) -> torch.dtype:
    """bf16 on CUDA (the paper's GPUs), fp32 on a CPU (bf16 matmuls are slow or missing there)."""
    return torch.bfloat16 if _device(device).type == "cuda" else torch.float32


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def caption_settings(
    model_path: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    device: str | torch.device | None = None,
    revision: str | None = None,
    settings: dict | None = None,
    kv_cache: str = DEFAULTS.kv_cache,
    attention: str = DEFAULTS.attention,
) -> dict:
    """Everything that determines a caption set, computed without loading the model: the model
    (path or hub id), its revision, a fingerprint of its files (`iisan.encoders.cache.weights_fingerprint`:
    weights, tokenizer, processor and chat template of a local folder; the id and revision of a
    hub model), the prompt's sha256, the decoding settings (with the KV cache and the attention
    when they are not the defaults, dynamic and sdpa: greedy decoding over another cache, padding
    or attention kernel may round differently),
    the compute dtype, and the caller's `settings` (what `images_for` feeds the model: frame
    positions, image source, ...)."""
    from iisan.encoders.cache import weights_fingerprint

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
    extra = jsonable(settings or {})
    clash = sorted(set(extra) & set(computed))
    if clash:
        raise ValueError(f"caption settings {clash} are computed by caption_settings; the caller's settings may not set them")
    return {**computed, **extra}


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

    from iisan.encoders.backbones import local_only

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
    activations fit the free memory of the model's GPUs (`iisan.captions.caption_bound.largest_batch`),
    at most `items`; AUTO_BATCH_CPU on a CPU."""
    from iisan.captions.caption_bound import largest_batch, shapes_from_config

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
    batch_size: int | str = DEFAULTS.batch_size,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    device: str | torch.device | None = None,
    settings: dict,
    revision: str | None = None,
    progress: bool | None = None,
    kv_cache: str = DEFAULTS.kv_cache,
    image_key: Callable[[Any], str] | None = None,
    memo: str | os.PathLike | None = None,
    attention: str = DEFAULTS.attention,
    workers: int = DEFAULTS.workers,
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
    ids = [plain_id(i) for i in item_ids]
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
    known = read_memo(memo_folder, key)
    done = {i: known[keys[i]] for i in ids if keys[i] in known}
    if done:
        log.info("%s: %d of %d items captioned already (same images and settings, in %s)", out_parquet, len(done), len(ids), here)
    # this job's record file starts with the records it reuses (a torn line of its own is dropped)
    with atomic_path(own, ".jsonl") as tmp:
        tmp.write_text("".join(memo_record(i, keys[i], *done[i]) for i in ids if i in done), encoding="utf-8")

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
                fh.write("".join(memo_record(i, keys[i], c, s) for i, c, s in zip(batch, captions, stopped)))
                fh.flush()
                os.fsync(fh.fileno())
                done.update({i: (c, s) for i, c, s in zip(batch, captions, stopped)})

    manifest = write_caption_set(
        out_parquet, ids, [done[i][0] for i in ids], settings=key,
        truncated=sum(not done[i][1] for i in ids),  # cut at max_new_tokens
        empty=sum(not done[i][0] for i in ids), batch_size=batch_size, device=str(dev), library_version=__version__,
    )
    if memo is None:
        prune_memo(memo_folder, key, [out_parquet.stem])
    if manifest["truncated"]:
        log.info("%s: %d of %d captions reached max_new_tokens=%d", out_parquet, manifest["truncated"], len(ids), max_new_tokens)
    return manifest
