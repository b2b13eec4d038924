"""LLaVA-NeXT caption throughput on one GPU: the caption rule's library calls for each decoding
option side by side, against the hardware bound (`iisan.captions.caption_bound`).

A random-weight model with the real shapes of llava-v1.6-mistral-7b-hf (CLIP ViT-L/14 at 336 px
with any-resolution tiling on the checkpoint's grid pinpoints, the two-layer projector, Mistral-7B:
32 layers x 4096, GQA 32/8 heads, FFN 14336, vocab 32064) or, with `--model llava-34b`, of
llava-v1.6-34b-hf (the same vision side, Yi-34B: 60 layers x 7168, GQA 56/8 heads, FFN 20480,
vocab 64064; 69.6 GB in bf16: one 141 GB card), bf16, built on the GPU for each option
with the `attn_implementation` that `iisan.captions.load_captioner` passes for it. The tokenizer
is a small word-level one trained here (the shapes of the text part are what cost); the images
are synthetic `--size` (w x h) JPEGs. Every caption runs to exactly `--new-tokens` tokens
(`min_new_tokens`), so the decode work is the configured maximum.

An option is ``cache/attention/workers`` (`iisan.captions.KV_CACHES`, `ATTENTIONS`, image
workers); the default path of the rule is ``dynamic/sdpa/0``. For each option and prompt kind
(a cover: one image slot; a video: three frames as three slots of one prompt):

* the batch call (`iisan.captions.llava._caption_batch`: processor, left padding, greedy `generate`)
  once with one new token and once with `--new-tokens`: prefill seconds (the one-token call less
  the processor) and ms per decode step (the difference over the extra steps), each as a share
  of its bound (prefill FLOPs at the measured bf16 matmul rate; weights + live KV cache read once
  per step at the measured copy bandwidth); peak GPU memory against the memory plan;
* the rule's own call (`iisan.captions.caption_dataset` on an items table and a zip of JPEGs, as
  the caption rule runs it; `load_captioner` hands it the model built here) over
  `--e2e-batches` batches: items/s from the end of its first batch to the end of its last
  (images read and processed in series or by the workers ahead), and whether its captions equal
  the first option's.

Prints one JSON line per (option, prompt) and a markdown table at the end.

    PYTHONPATH=src:benchmarks python benchmarks/caption_speed.py                  # on a GPU
    PYTHONPATH=src:benchmarks python benchmarks/caption_speed.py --smoke          # on a CPU, seconds

Needs torch, transformers, tokenizers, safetensors, pillow, numpy, pyyaml, tqdm, polars and
xxhash (the last two: `iisan.captions` writes Parquet and checksums).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from iisan import captions
from iisan.captions.caption_bound import caption_bound, memory_bytes, shapes_from_config

# the module holding the batch call, the encoder and `load_captioner` as `caption_items` looks them
# up: iisan.captions.llava since the captions package (2026-12-07); an earlier tree on PYTHONPATH
# (a before/after in one call) had them in iisan.captions itself
try:
    from iisan.captions import llava as LIB
except ImportError:
    LIB = captions

MICROLENS_ITEMS = 19_738
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 grid
PROMPTS = {"cover": {"text": "Describe this cover image in one or two sentences, like a caption of a picture.", "images": 1},
           "video": {"text": "These are three frames of one video in time order. Describe the whole video in a few sentences.",
                     "images": 3}}
DEFAULT_OPTIONS = "dynamic/sdpa/0,static/sdpa/0,static/sdpa_gqa/0,static/sdpa_gqa/2,static/flex_attention/2"


CLIP_336 = dict(v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16, tile=336, patch=14, pinpoints=PINPOINTS_336)
MODELS = {  # the llava-hf checkpoints' shapes (config.json of each)
    "llava-mistral-7b": dict(CLIP_336, family="mistral", hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=32064, rope_theta=1e6),
    "llava-34b": dict(CLIP_336, family="llama", hidden=7168, inter=20480, layers=60, heads=56, kv=8, vocab=64064, rope_theta=5e6),
}


def shapes(smoke: bool, model: str = "llava-mistral-7b") -> dict:
    if smoke:
        return dict(v_hidden=32, v_inter=64, v_layers=2, v_heads=2, tile=32, patch=8, hidden=64, inter=128, layers=2,
                    heads=4, kv=2, vocab=2000, pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
                    family=MODELS[model]["family"], rope_theta=1e6)
    return MODELS[model]


def build_config(s: dict, prompts: list[str]):
    """(LlavaNextConfig, processor) with the shapes `s`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor, MistralConfig

    from iisan.encoders.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(prompts * 4, vocab_size=500)
    tok.add_special_tokens({"extra_special_tokens": ["<image>", *captions.TURN_TOKENS[s["family"]]]})
    common = dict(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv"], vocab_size=max(s["vocab"], len(tok)), max_position_embeddings=32768,
                  rope_theta=s["rope_theta"], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    text = MistralConfig(**common, sliding_window=None) if s["family"] == "mistral" else LlamaConfig(**common)
    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"], num_hidden_layers=s["v_layers"],
                              num_attention_heads=s["v_heads"], image_size=s["tile"], patch_size=s["patch"], projection_dim=768)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=s["pinpoints"], vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_seq_length=(s["tile"] // s["patch"]) ** 2)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": s["tile"]}, crop_size={"height": s["tile"], "width": s["tile"]},
                                                   image_grid_pinpoints=s["pinpoints"]),
        tokenizer=tok, patch_size=s["patch"], vision_feature_select_strategy="default",
        chat_template=captions.CHAT_TEMPLATES[s["family"]], image_token="<image>", num_additional_image_tokens=1)
    tok.padding_side = "left"
    return config, processor


def build_model(config, attention: str, device: torch.device, dtype: torch.dtype):
    """Random weights (init std 0.02) on `device`, the language model on `attention` as
    `load_captioner` sets it."""
    from transformers import LlavaNextForConditionalGeneration

    impl = captions.attn_implementation(attention)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype, **({"attn_implementation": impl} if impl else {}))
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device, dtype, n=8192, reps=50) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def bandwidth_gbs(device, gib=4, reps=20) -> float:
    """Device copy: bytes read + written per second."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    rate = 2 * x.numel() * reps / (time.perf_counter() - t) / 1e9
    del x, y
    if device.type == "cuda":  # hand the 2 x `gib` back: the memory plan (`batch auto`) reads the free memory
        torch.cuda.empty_cache()
    return rate


def synthetic_jpegs(n: int, w: int, h: int, seed=0) -> list[bytes]:
    """`n` distinct w x h JPEGs: smooth random colour fields with fine noise (photo-like sizes)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        px = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_dataset(work: Path, kind: str, items: int, jpegs: list[bytes], frames: int) -> tuple[Path, Path]:
    """(items.parquet, image archive) as the caption rule reads them: covers named by the
    table's `image` column, video frames ``<item_id>_<k>.jpg``."""
    import polars as pl

    ids = [f"{kind}{i:05d}" for i in range(items)]
    archive = work / f"{kind}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for n, i in enumerate(ids):
            names = [f"{i}.jpg"] if kind == "cover" else [f"{i}_{k}.jpg" for k in range(frames)]
            for k, name in enumerate(names):
                zf.writestr(name, jpegs[(n * len(names) + k) % len(jpegs)])
    table = work / f"{kind}_items.parquet"
    pl.DataFrame({"item_id": ids, "image": [f"{i}.jpg" for i in ids]}).write_parquet(table)
    return table, archive


# The library's static-cache layout: one cache of the job's longest prompt + max_new_tokens rounded
# up to STATIC_BUCKET, prompts padded to their batch's longest (`static_cache_length`); a library
# without it (an earlier tree on PYTHONPATH, for a before/after in one call) padded every prompt to a
# multiple of STATIC_BUCKET and sized the cache to the padded prompt + max_new_tokens.
CACHE_PER_JOB = hasattr(captions, "static_cache_length")


def static_layout(prompt_tokens: int, new_tokens: int) -> tuple[int | None, int]:
    """(multiple the prompts are padded to or None, static cache length) of the library on the path."""
    if CACHE_PER_JOB:
        return None, captions.static_cache_length(prompt_tokens, new_tokens)
    padded = -(-prompt_tokens // captions.STATIC_BUCKET) * captions.STATIC_BUCKET
    return captions.STATIC_BUCKET, padded + new_tokens


def forced(model, processor, n: int, cache_len: int | None):
    """The library's greedy generation config for exactly `n` new tokens (static cache of
    `cache_len` tokens; dynamic when None)."""
    from transformers import GenerationConfig

    greedy = {k: v for k, v in captions.GREEDY.items() if k != "min_length"}  # min_new_tokens sets it
    static = {} if cache_len is None else {"cache_implementation": "static", **({"max_cache_len": cache_len} if CACHE_PER_JOB else {})}
    return GenerationConfig(**greedy, max_new_tokens=n, min_new_tokens=n, eos_token_id=captions.stop_token_ids(model, processor.tokenizer),
                            pad_token_id=processor.tokenizer.pad_token_id, **static)


def encode(processor, texts, images, pad, dtype) -> dict:
    if CACHE_PER_JOB:
        return LIB._encode(processor, texts, images, dtype)
    return LIB._encode(processor, texts, images, pad, dtype)


def timed_batch(model, processor, texts, images, gen, pad, device) -> tuple[float, list[str]]:
    sync(device)
    t = time.perf_counter()
    caps, _ = LIB._caption_batch(model, processor, texts, images, gen, *([] if CACHE_PER_JOB else [pad]))
    sync(device)
    return time.perf_counter() - t, caps


def batch_rates(model, processor, kind, b, images, static, new_tokens, device) -> dict:
    """Prefill s, decode ms/step and peak memory of the library's batch call on `b` items."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n_img = PROMPTS[kind]["images"]
    text = processor.apply_chat_template(captions.conversation(PROMPTS[kind]["text"], n_img), add_generation_prompt=True)
    texts = [text] * b
    unpadded = encode(processor, texts[:1], images[:n_img], None, model.dtype)["input_ids"].shape[1]
    pad, cache_len = static_layout(unpadded, new_tokens) if static else (None, None)
    t = time.perf_counter()
    enc = encode(processor, texts, images, pad, model.dtype)
    t_proc = time.perf_counter() - t

    def gen(n):
        return forced(model, processor, n, cache_len)

    timed_batch(model, processor, texts, images, gen(new_tokens if static else 2), pad, device)  # warm-up (compiles the static decode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1, _ = timed_batch(model, processor, texts, images, gen(1), pad, device)
    tn, caps = timed_batch(model, processor, texts, images, gen(new_tokens), pad, device)
    pv = model.config.vision_config
    tiles = sum(image_size_to_num_patches(hw, model.config.image_grid_pinpoints, pv.image_size) for hw in enc["image_sizes"].tolist())
    return {"prompt_tokens": round(enc["attention_mask"].sum().item() / b), "padded_tokens": enc["input_ids"].shape[1],
            "cache_tokens": cache_len, "pad": pad,
            "tiles_per_item": tiles / b, "preprocess_s": t_proc, "prefill_s": t1 - t_proc, "step_s": (tn - t1) / (new_tokens - 1),
            "batch_s": tn, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def rule_call(model, processor, kind, b, batches, workers, cache, attention, new_tokens, device, work, jpegs) -> dict:
    """items/s of `caption_dataset` (the rule's call) over `batches` batches of `b` items after its first batch."""
    table, archive = write_dataset(work, kind, b * batches, jpegs, PROMPTS[kind]["images"])
    prompts_file = work / "prompts.yaml"
    import yaml

    prompts_file.write_text(yaml.safe_dump(PROMPTS))
    ends, real_batch, real_load = [], LIB._caption_batch, LIB.load_captioner

    def batch_call(model_, processor_, texts, images, gen, *args, **kwargs):
        gen.min_new_tokens = gen.max_new_tokens  # every caption runs to the maximum
        out = real_batch(model_, processor_, texts, images, gen, *args, **kwargs)
        ends.append(time.perf_counter())
        return out

    LIB._caption_batch = batch_call
    LIB.load_captioner = lambda *a, **k: (model, processor)
    out = work / f"{kind}_{cache}_{attention}_{workers}.parquet"
    positions = [0.1, 0.5, 0.9][:PROMPTS[kind]["images"]]
    try:
        t = time.perf_counter()
        if hasattr(captions, "CaptionJob"):  # the captions package: one job object
            settings = captions.CaptionSettings(max_new_tokens=new_tokens, batch_size=b, kv_cache=cache, attention=attention,
                                                workers=workers, frames=tuple(positions) if kind == "video" else (0.1, 0.5, 0.9))
            job = captions.CaptionJob(source=kind, captioner="random-llava-next", caption_set=str(out), settings=settings, revision="random")
            captions.caption_dataset(job, table, archive, prompts_file, out, device=str(device))
        else:
            captions.caption_dataset(table, kind, archive, "random-llava-next", prompts_file, out, positions=positions,
                                     batch_size=b, max_new_tokens=new_tokens, device=str(device), revision="random",
                                     kv_cache=cache, attention=attention, workers=workers)
        wall = time.perf_counter() - t
    finally:
        LIB._caption_batch, LIB.load_captioner = real_batch, real_load
    import polars as pl

    steady = b * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None
    return {"e2e_items_s": steady, "e2e_wall_s": wall, "captions": pl.read_parquet(out)["caption"].to_list()}


def release_cache(model, device) -> None:
    """Forget the static cache length that generate keeps on the model (`_previous_max_cache_length`:
    a later, shorter prompt would otherwise get a cache as long as the longest before it), then free
    the allocator's blocks."""
    if hasattr(model, "_previous_max_cache_length"):
        del model._previous_max_cache_length
    free(device)


def free(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script in seconds")
    ap.add_argument("--model", default="llava-mistral-7b", choices=sorted(MODELS), help="whose shapes the random-weight model takes")
    ap.add_argument("--size", default="1280x720", help="cover / frame size, w x h")
    ap.add_argument("--prompts", default="cover,video")
    ap.add_argument("--options", default=DEFAULT_OPTIONS, help="cache/attention/workers, comma-separated; the first is the reference")
    ap.add_argument("--cover-batch", default="64", help="items per batch, or auto (the memory plan of the free memory)")
    ap.add_argument("--video-batch", default="32")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--e2e-batches", type=int, default=3, help="batches of the rule's call (0: skip it)")
    ap.add_argument("--work", default=None, help="folder for the synthetic dataset and outputs (default: a temporary one)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile the prefill and N decode steps: GPU time per kernel family")
    ap.add_argument("--profile-prefill", action="store_true", help="also profile the prefill (without decode steps unless --profile N)")
    ap.add_argument("--captions-out", default=None, help="write each (option, prompt)'s captions of the rule's call to this JSON file")
    args = ap.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = captions.compute_dtype(device)
    elem = torch.finfo(dtype).bits // 8
    if args.smoke:
        args.size, args.new_tokens = "64x48", 4
        args.cover_batch = "auto" if args.cover_batch == "auto" else "3"
        args.video_batch = "auto" if args.video_batch == "auto" else "2"
        args.e2e_batches = min(args.e2e_batches, 2)
        if args.options == DEFAULT_OPTIONS:  # FlexAttention compiles with inductor: minutes on a CPU
            args.options = "dynamic/sdpa/0,static/sdpa/0,static/sdpa_gqa/0,static/sdpa_gqa/2"
    s = shapes(args.smoke, args.model)
    config, processor = build_config(s, [p["text"] for p in PROMPTS.values()])
    w, h = map(int, args.size.split("x"))
    rate = matmul_tflops(device, dtype, n=512 if args.smoke else 8192, reps=3 if args.smoke else 50)
    bw = bandwidth_gbs(device, gib=0.25 if args.smoke else 4, reps=3 if args.smoke else 20)
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else None
    import transformers

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": str(dtype), "matmul_tflops": round(rate, 1),
           "bandwidth_gbs": round(bw, 1), "model": args.model, "params_b": round(shapes_from_config(config).params / 1e9, 3), "image": args.size,
           "new_tokens": args.new_tokens, "dev_shm_gib": None if shm is None else round(shm, 1)}
    print(json.dumps(env), flush=True)
    from PIL import Image

    jpegs = synthetic_jpegs(8 if args.smoke else 24, w, h)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="caption_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    bound_shapes = shapes_from_config(config)
    rows, reference, dumped = [], {}, {}
    for option in args.options.split(","):
        cache, attention, workers = option.split("/")
        workers = int(workers)
        t_build = time.perf_counter()
        try:
            model = build_model(config, attention, device, dtype)
        except Exception as err:  # an attention this transformers / torch cannot build
            print(json.dumps({"option": option, "error": f"{type(err).__name__}: {str(err)[:200]}"}), flush=True)
            continue
        build_s = time.perf_counter() - t_build
        for kind in args.prompts.split(","):
            n_img = PROMPTS[kind]["images"]
            batch_arg = args.cover_batch if kind == "cover" else args.video_batch
            row = {"option": option, "prompt": kind, "cache": cache, "attention": attention, "workers": workers}
            t_row = time.perf_counter()
            try:
                if batch_arg == "auto":
                    text = processor.apply_chat_template(captions.conversation(PROMPTS[kind]["text"], n_img), add_generation_prompt=True)
                    one = [Image.open(io.BytesIO(jpegs[k])).convert("RGB") for k in range(n_img)]
                    tokens = encode(processor, [text], one, None, dtype)["input_ids"].shape[1]
                    if cache == "static":
                        tokens = static_layout(tokens, args.new_tokens)[1] - args.new_tokens  # the plan's prompt: the cache less the new tokens
                    b = captions.auto_batch_size(model, tokens, args.new_tokens, 4096)
                else:
                    b = int(batch_arg)
                images = [Image.open(io.BytesIO(jpegs[k % len(jpegs)])).convert("RGB") for k in range(b * n_img)]
                r = batch_rates(model, processor, kind, b, images, cache == "static", args.new_tokens, device)
                # the batch call's numbers at once (a long rule's call cut off by a time limit leaves them)
                print(json.dumps({**row, "part": "batch_call", "batch": b, **{k: round(v, 4) if isinstance(v, float) else v
                                                                              for k, v in r.items()}}), flush=True)
                if args.e2e_batches:
                    r.update(rule_call(model, processor, kind, b, args.e2e_batches, workers, cache, attention, args.new_tokens,
                                       device, work, jpegs))
            except Exception as err:  # out of memory, or an option this transformers / torch cannot run: the next row
                print(json.dumps({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"}), flush=True)
                free(device)
                continue
            bound = caption_bound(bound_shapes, prompt_tokens=r["prompt_tokens"], tiles=r["tiles_per_item"], new_tokens=args.new_tokens,
                                  batch=b, tflops=rate, bandwidth_gbs=bw, elem=elem)
            caps = r.pop("captions", None)
            if caps is not None:
                reference.setdefault(kind, caps)
                dumped[f"{option} {kind}"] = caps
            items_s = b / r["batch_s"]
            row.update({
                "batch": b, "prompt_tokens": r["prompt_tokens"], "padded_tokens": r["padded_tokens"], "tiles_per_item": r["tiles_per_item"],
                "preprocess_s": round(r["preprocess_s"], 3), "prefill_s": round(r["prefill_s"], 3),
                "prefill_of_bound": round(bound.prefill_s * b / r["prefill_s"], 3),
                "decode_step_ms": round(r["step_s"] * 1e3, 2), "decode_of_bound": round(bound.step_s / r["step_s"], 3),
                "items_s_batch_call": round(items_s, 3), "items_s_bound": round(bound.items_per_s, 3),
                "items_s_rule": None if r.get("e2e_items_s") is None else round(r["e2e_items_s"], 3),
                "rule_wall_s": None if "e2e_wall_s" not in r else round(r["e2e_wall_s"], 1),
                "hours_19738": round(MICROLENS_ITEMS / (r.get("e2e_items_s") or items_s) / 3600, 2),
                "peak_gib": None if r["peak_gib"] is None else round(r["peak_gib"], 1),
                "cache_tokens": r["cache_tokens"],
                "plan_gib": round(memory_bytes(bound_shapes, batch=b, new_tokens=args.new_tokens,
                                               prompt_tokens=r["padded_tokens"] if r["cache_tokens"] is None else r["cache_tokens"] - args.new_tokens,
                                               elem=elem) / 2**30, 1),
                "same_captions_as_first": None if caps is None else round(np.mean([a == c for a, c in zip(caps, reference[kind])]), 3),
                "build_s": round(build_s, 1), "row_s": round(time.perf_counter() - t_row, 1),
            })
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.profile or args.profile_prefill:
                profile(model, processor, kind, b, images, r["cache_tokens"], r["pad"], r["padded_tokens"], args.profile, device, option)
            release_cache(model, device)  # the next prompt's cache and peak as in a job of its own
        del model
        free(device)
    print(table(rows, env))
    if args.captions_out:
        Path(args.captions_out).write_text(json.dumps(dumped))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def profile(model, processor, kind, b, images, cache_len, pad, padded_tokens, n, device, option):
    """GPU kernel time by kernel family of the prefill (a 1-token generation: vision tower,
    projector, prompt) and, when n > 0, per decode step (an (n+1)-token generation less it)."""
    from gpu_profile import kernels, summary

    text = processor.apply_chat_template(captions.conversation(PROMPTS[kind]["text"], PROMPTS[kind]["images"]), add_generation_prompt=True)

    def run(steps):
        gen = forced(model, processor, steps, cache_len)
        return kernels(lambda: timed_batch(model, processor, [text] * b, images, gen, pad, device), device)

    w1, e1 = run(1)
    print(json.dumps({"profile": kind, "part": "prefill", "option": option, "batch": b, "prompt_tokens": padded_tokens,
                      "cache_tokens": cache_len, "wall_s": round(w1, 3), **summary(e1, 1, top=12, width=90)}), flush=True)
    if n:
        wn, en = run(n + 1)
        print(json.dumps({"profile": kind, "part": "decode", "option": option, "batch": b, "decode_steps": n,
                          "step_ms": round((wn - w1) / n * 1e3, 2), **summary(en[len(e1):], n)}), flush=True)


def table(rows: list[dict], env: dict) -> str:
    head = ("| prompt | batch | cache / attention / workers | prefill s (of bound) | decode ms/step (of bound) | items/s batch call "
            "| items/s rule | items/s bound | peak GiB (plan) | same captions |")
    lines = [f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}: "
             f"{env['matmul_tflops']} TFLOP/s matmul, {env['bandwidth_gbs']} GB/s copy, {env['new_tokens']} new tokens, "
             f"/dev/shm {env['dev_shm_gib']} GiB", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['prompt']} ({r['prompt_tokens']} tokens) | {r['batch']} | {r['option']} | {r['prefill_s']:.2f} ({r['prefill_of_bound']:.0%}) "
            f"| {r['decode_step_ms']:.1f} ({r['decode_of_bound']:.0%}) | {r['items_s_batch_call']:.2f} | {fmt(r['items_s_rule'], '.2f')} "
            f"| {r['items_s_bound']:.2f} | {fmt(r['peak_gib'], '.1f')} ({r['plan_gib']:.1f}) | {fmt(r['same_captions_as_first'], '.0%')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
