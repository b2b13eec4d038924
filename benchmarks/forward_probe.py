"""Probe: pure forward time of a Llama-7B-shaped decoder at several batch sizes (30 tokens)."""
import json
import time

import torch
from transformers import LlamaConfig, LlamaModel

cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=64, pad_token_id=0)
with torch.device("cuda"):
    model = LlamaModel(cfg).to(torch.bfloat16).eval()
for attn in ("sdpa", "eager"):
    model.config._attn_implementation = attn
    for B in (128, 512):
        ids = torch.randint(1, 32000, (B, 30), device="cuda")
        with torch.no_grad():
            for hs in (False, True):
                for _ in range(2):
                    model(input_ids=ids, output_hidden_states=hs)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(5):
                    model(input_ids=ids, output_hidden_states=hs)
                torch.cuda.synchronize()
                dt = (time.perf_counter() - t) / 5
                print(json.dumps({"attn": attn, "batch": B, "hidden_states": hs, "ms": round(dt * 1000, 1),
                                  "tflops": round(2 * 6.476e9 * B * 30 / dt / 1e12, 1)}), flush=True)
