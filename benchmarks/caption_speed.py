"""LLaVA-NeXT caption throughput on one GPU (issue: MicroLens and captions §5).

A random-weight model with the real shapes of llava-v1.6-mistral-7b-hf (CLIP ViT-L/14 at 336 px
with any-resolution tiling on the checkpoint's grid pinpoints, the two-layer projector, Mistral-7B:
32 layers x 4096, GQA 32/8 heads, FFN 14336, vocab 32064), bf16, captioning through the library's
own batch call (`iisan.captions._caption_batch`: processor, left padding, greedy `generate`).
The tokenizer is a small word-level one trained here (the shapes of the text part are what cost);
the images are synthetic covers of `--size` (w x h) pixels. Every caption runs to exactly
`--new-tokens` tokens (no stop token), so the decode work is the configured maximum.

Prints one JSON line per (prompt kind, batch size, cache): items/s, prefill time and TFLOP/s as a
fraction of the measured bf16 matmul rate, decode tokens/s as a fraction of what the measured
memory bandwidth allows (weights + the live KV cache read once per step), peak memory, and the
hours to caption 19,738 MicroLens items at that rate.

    PYTHONPATH=src python benchmarks/caption_speed.py                 # on a GPU
    PYTHONPATH=src python benchmarks/caption_speed.py --tiny          # a smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from iisan.captions import CHAT_TEMPLATES, GREEDY, TURN_TOKENS, _caption_batch, conversation

from gpu_profile import kernels, summary

MICROLENS_ITEMS = 19_738
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 grid


def shapes(tiny: bool) -> dict:
    if tiny:
        return dict(v_hidden=32, v_inter=64, v_layers=2, v_heads=2, tile=32, patch=8, hidden=64, inter=128, layers=2,
                    heads=4, kv=2, vocab=2000, pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]])
    return dict(v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16, tile=336, patch=14, hidden=4096, inter=14336,
                layers=32, heads=32, kv=8, vocab=32064, pinpoints=PINPOINTS_336)


def build(s: dict, device: torch.device, dtype: torch.dtype, prompts: list[str]):
    """(model, processor) with the shapes `s`, random weights (std 0.02), on `device`."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from iisan.backbones import train_bpe_tokenizer

    tok = train_bpe_tokenizer(prompts * 4, vocab_size=500)
    tok.add_special_tokens({"extra_special_tokens": ["<image>", *TURN_TOKENS["mistral"]]})
    text = MistralConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=max(s["vocab"], len(tok)),
                         max_position_embeddings=32768, sliding_window=None, rope_theta=1e6,
                         pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"], num_hidden_layers=s["v_layers"],
                              num_attention_heads=s["v_heads"], image_size=s["tile"], patch_size=s["patch"], projection_dim=768)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=s["pinpoints"], vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_seq_length=(s["tile"] // s["patch"]) ** 2)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlavaNextForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": s["tile"]}, crop_size={"height": s["tile"], "width": s["tile"]},
                                                   image_grid_pinpoints=s["pinpoints"]),
        tokenizer=tok, patch_size=s["patch"], vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATES["mistral"], image_token="<image>", num_additional_image_tokens=1)
    tok.padding_side = "left"
    return model, processor


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
    x = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * reps / (time.perf_counter() - t) / 1e9


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def prefill_flops(model, s, n_tiles: int, prompt_tokens: list[int]) -> float:
    """Matmul FLOPs of one batch's prefill: the vision tower on every tile (all its layers run),
    the projector and the language model on every prompt token, causal attention (T^2 d per layer
    for QK^T and AV together, x2 for multiply-add)."""
    vt = model.model.vision_tower
    v_tokens = (s["tile"] // s["patch"]) ** 2 + 1
    v_lin = params(vt.encoder) + params(vt.embeddings.patch_embedding)  # every layer and the patch projection
    vision = n_tiles * (2 * v_lin * v_tokens + 4 * s["v_layers"] * v_tokens**2 * s["v_hidden"])
    proj = 2 * params(model.model.multi_modal_projector) * sum(prompt_tokens)
    lm_lin = params(model.model.language_model) - params(model.model.language_model.embed_tokens) + params(model.lm_head)
    lm = sum(2 * lm_lin * t + 2 * s["layers"] * t**2 * s["hidden"] for t in prompt_tokens)
    return vision + proj + lm


def decode_bytes(model, s, prompt_tokens: list[int], new_tokens: int, elem: int) -> float:
    """Bytes one decode step must read on average: the language model's weights (the embedding
    table only for the batch's rows, ignored) and each sequence's live KV cache."""
    lm = params(model.model.language_model) - params(model.model.language_model.embed_tokens) + params(model.lm_head)
    kv_per_token = 2 * s["layers"] * s["kv"] * (s["hidden"] // s["heads"]) * elem
    return lm * elem + sum(kv_per_token * (t + new_tokens / 2) for t in prompt_tokens)


def run_batch(model, processor, texts, images, gen, device):
    sync(device)
    t = time.perf_counter()
    captions, _ = _caption_batch(model, processor, texts, images, gen)
    sync(device)
    return time.perf_counter() - t, captions


def profile_decode(model, processor, texts, images, gen_config, n, device, kind, b, cache):
    """GPU kernel time against wall time over the decode steps, and the kernels that take it:
    a 1-token and an (n+1)-token generation, the difference is n decode steps."""
    def run(steps):
        return kernels(lambda: run_batch(model, processor, texts, images, gen_config(steps), device), device)

    w1, e1 = run(1)
    wn, en = run(n + 1)
    decode = summary(en[len(e1):], n)
    decode["gpu_busy_ms_per_step"] = round((sum(t for _, t in en) - sum(t for _, t in e1)) / n / 1e3, 2)
    decode["kernels_per_step"] = round((len(en) - len(e1)) / n, 1)
    print(json.dumps({"profile": kind, "batch": b, "cache": cache, "decode_steps": n,
                      "step_ms": round((wn - w1) / n * 1e3, 2), **decode}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", default="1280x720", help="cover / frame size, w x h")
    ap.add_argument("--cover-batches", default="8,16,32")
    ap.add_argument("--video-batches", default="4,8,16")
    ap.add_argument("--new-tokens", type=int, default=300)
    ap.add_argument("--caches", default="dynamic,static", help="KV caches to time: dynamic (eager decode), static (compiled decode)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N decode steps: GPU busy fraction and the kernels that dominate")
    args = ap.parse_args()
    from PIL import Image
    from transformers import GenerationConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    s = shapes(args.tiny)
    prompts = {"cover": "Describe this cover image in one or two sentences, like a caption of a picture.",
               "video": "These are three frames of one video in time order. Describe the whole video in a few sentences."}
    model, processor = build(s, device, dtype, list(prompts.values()))
    w, h = map(int, args.size.split("x"))
    rate = matmul_tflops(device, dtype, n=1024 if args.tiny else 8192, reps=5 if args.tiny else 50)
    bw = bandwidth_gbs(device, gib=1 if args.tiny else 4, reps=3 if args.tiny else 20)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype), "matmul_tflops": round(rate, 1), "bandwidth_gbs": round(bw, 1),
           "params_b": round(params(model) / 1e9, 3), "image": args.size}
    print(json.dumps(env), flush=True)
    import numpy as np

    rng = np.random.default_rng(0)

    def image():
        return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))

    for kind, n_img, batches in (("cover", 1, args.cover_batches), ("video", 3, args.video_batches)):
        stop = processor.tokenizer.eos_token_id or 0  # masked until min_new_tokens = max_new_tokens
        text = processor.apply_chat_template(conversation(prompts[kind], n_img), add_generation_prompt=True)
        for b in map(int, batches.split(",")):
            images = [image() for _ in range(b * n_img)]
            texts = [text] * b
            t = time.perf_counter()
            enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
            t_proc = time.perf_counter() - t
            prompt_tokens = enc["attention_mask"].sum(1).tolist()
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            n_tiles = sum(image_size_to_num_patches(hw, s["pinpoints"], s["tile"]) for hw in enc["image_sizes"].tolist())
            for cache in args.caches.split(","):
                extra = {"cache_implementation": "static"} if cache == "static" else {}

                def gen_config(n, stop=stop, extra=extra):
                    return GenerationConfig(**GREEDY, max_new_tokens=n, min_new_tokens=n, eos_token_id=[stop],
                                            pad_token_id=processor.tokenizer.pad_token_id, **extra)

                try:
                    run_batch(model, processor, texts, images, gen_config(2), device)  # warm-up
                    if cache == "static":  # compile for the full cache length
                        run_batch(model, processor, texts, images, gen_config(args.new_tokens), device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t1, _ = run_batch(model, processor, texts, images, gen_config(1), device)
                    tn, caps = run_batch(model, processor, texts, images, gen_config(args.new_tokens), device)
                except torch.OutOfMemoryError as err:
                    print(json.dumps({"prompt": kind, "batch": b, "cache": cache, "error": f"out of memory: {str(err)[:80]}"}), flush=True)
                    torch.cuda.empty_cache()
                    continue
                prefill = t1 - t_proc  # generate with one new token: preprocessing + prefill (+ one head)
                step = (tn - t1) / (args.new_tokens - 1)
                flops = prefill_flops(model, s, n_tiles, prompt_tokens)
                bound = decode_bytes(model, s, prompt_tokens, args.new_tokens, elem) / (bw * 1e9)
                items_s = b / tn
                print(json.dumps({
                    "prompt": kind, "batch": b, "cache": cache, "images_per_item": n_img,
                    "prompt_tokens": round(sum(prompt_tokens) / b), "tiles_per_item": n_tiles / b,
                    "new_tokens": args.new_tokens, "batch_s": round(tn, 3), "preprocess_s": round(t_proc, 3),
                    "prefill_s": round(prefill, 3), "prefill_tflops": round(flops / prefill / 1e12, 1),
                    "prefill_frac_matmul": round(flops / prefill / 1e12 / rate, 3),
                    "decode_step_ms": round(step * 1e3, 2), "decode_tokens_s": round(b / step, 1),
                    "decode_frac_bandwidth": round(bound / step, 3), "items_s": round(items_s, 3),
                    "hours_19738": round(MICROLENS_ITEMS / items_s / 3600, 2),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
                    "caption_words": len(caps[0].split()),
                }), flush=True)
                if args.profile:
                    profile_decode(model, processor, texts, images, gen_config, args.profile, device, kind, b, cache)


if __name__ == "__main__":
    main()
