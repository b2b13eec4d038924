"""Caching throughput of a Llama-7B-shaped decoder.

Random weights (speed does not depend on values), 30-token titles (BOS + title cut at 30),
the cache's own tokenisation and pooling (`iisan.encoders.item_inputs.encode_texts`, `pool_states`; unmasked mean over
30 positions as the authors), batches sorted by token length. bf16, then the same model with
every Linear replaced by a bitsandbytes NF4 4-bit layer. Prints items/s and the achieved
fraction of this GPU's measured bf16 matmul rate.

    PYTHONPATH=src python benchmarks/cache_speed.py [--items 4096] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from caption_speed import matmul_tflops  # one measured matmul rate for the GPU benchmarks

from iisan.encoders.backbones import BackboneSpec
from iisan.encoders.cache import encode_batches
from iisan.encoders.tokenizers import train_bpe_tokenizer


def titles(n: int, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(3000)]
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 40)))) for _ in range(n)]


def to_4bit(model):
    import bitsandbytes as bnb

    for _, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                setattr(mod, cname, q.cuda())
    torch.cuda.empty_cache()
    return model


def run(model, spec, tok, texts, batch) -> dict:
    """The cache rule's own loop (`iisan.encoders.cache.encode_batches`): length-sorted batches,
    pooling on the GPU, device-to-host copies overlapped with the next forward pass."""
    lengths = np.array([len(x) for x in tok(texts, max_length=30, truncation=True)["input_ids"]])
    order = np.argsort(lengths, kind="stable")
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    out = np.zeros((len(texts), spec.layers + 1, spec.hidden), dtype=np.float16)

    def write(b, idx, rows):
        out[idx] = rows

    encode_batches(spec, model, tok, texts, batches[:2], write, np.float16, progress=False)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    encode_batches(spec, model, tok, texts, batches, write, np.float16, progress=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 3), "items_per_s": round(len(texts) / dt, 1), "finite": bool(np.isfinite(out).all())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaModel

    peak = matmul_tflops(torch.device("cuda"), torch.bfloat16)
    texts = titles(args.items)
    tok = train_bpe_tokenizer(texts, vocab_size=8000)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=64, pad_token_id=0)
    spec = BackboneSpec.from_config("llama-7b-shape", dict(source="random", family="llama", modality="text", layers=32, hidden=4096, pooling="mean"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaModel(cfg).to(torch.bfloat16).eval()
    nonembed = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    flops_per_item = 2 * nonembed * 30  # 30 tokens, attention over 30 positions is negligible
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "measured_bf16_matmul_tflops": round(peak, 1),
           "nonembedding_params": nonembed, "items": args.items, "batch": args.batch}
    bf16 = run(model, spec, tok, texts, args.batch)
    bf16["achieved_tflops"] = round(bf16["items_per_s"] * flops_per_item / 1e12, 1)
    bf16["fraction_of_matmul_rate"] = round(bf16["achieved_tflops"] / peak, 3)
    res["bf16"] = bf16
    res["bf16_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(res), flush=True)
    try:
        model = to_4bit(model)
        torch.cuda.reset_peak_memory_stats()
        q = run(model, spec, tok, texts, args.batch)
        q["achieved_tflops"] = round(q["items_per_s"] * flops_per_item / 1e12, 1)
        q["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["nf4"] = q
    except ImportError as err:
        res["nf4"] = f"skipped: {err}"
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
