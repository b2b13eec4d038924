"""What bf16 autocast itself costs the baselines.

Under bf16 autocast (the workflow's arithmetic, as the authors' fp16 autocast) LayerNorm runs and
returns fp32, so the residual stream, the residual adds and every LayerNorm read and write are
fp32; only the matmuls and attention are bf16. This measures one BERT-base + ViT-base forward and
backward at the baselines' shapes (batch 32 with every item slot: 352 titles of 30 tokens and
352 images of 224x224), each transformer layer compiled as the workflow does, twice: under
autocast, and with the backbones held in bf16 without autocast (a bf16 residual stream: other
arithmetic, so other results; an upper bound on what removing autocast's fp32 work would give,
not a training recipe). Trainable tensors as FFT or BitFit; AdamW; FLOPs by torch's
FlopCounterMode over one eager step; the fraction is of an 8192^3 bf16 matmul timed in the same
process.

    PYTHONPATH=src:benchmarks python benchmarks/bf16_ceiling.py [--methods fft,bitfit] [--steps 15] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch


def build(method: str, pure: bool, smoke: bool, device: torch.device):
    from iisan.encoders.finetune import compile_layers

    from baselines_speed import backbones, item_inputs

    torch.manual_seed(0)
    bert, vit, size = backbones(method, smoke)
    dtype = torch.bfloat16 if pure else torch.float32
    bert, vit = bert.to(device, dtype), vit.to(device, dtype)
    text, pixels = item_inputs(352, size, torch.Generator().manual_seed(0))
    text = {k: v.to(device) for k, v in text.items()}
    pixels = pixels.to(device, dtype) / 127.5 - 1
    params = [p for m in (bert, vit) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    bert.train(), vit.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not pure):
            a = bert(**text).last_hidden_state[:, 0]
            b = vit(pixel_values=pixels).last_hidden_state[:, 0]
            loss = (a.float() * b.float()).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def compile_():
        if device.type == "cuda":
            compile_layers(bert)
            compile_layers(vit)

    return step, compile_


def measure(method: str, pure: bool, steps: int, smoke: bool) -> dict:
    from caption_speed import matmul_tflops
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device("cpu" if smoke else "cuda")
    step, compile_ = build(method, pure, smoke, device)
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    compile_()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(4):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    sync()
    per_step = (time.perf_counter() - t0) / steps
    rate = matmul_tflops(device, torch.bfloat16, n=256 if smoke else 8192)
    achieved = flops / per_step / 1e12
    return {
        "method": method,
        "arithmetic": "bf16 backbones, no autocast" if pure else "bf16 autocast (the workflow's)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds_per_step": round(per_step, 5),
        "step_tflop": round(flops / 1e12, 3),
        "achieved_tflops": round(achieved, 1),
        "matmul_tflops": round(rate, 1),
        "fraction_of_matmul_rate": round(achieved / rate, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="fft,bitfit")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="tiny widths on the CPU, to check the script")
    args = ap.parse_args()
    for method in args.methods.split(","):
        for pure in (False, True):
            print(json.dumps(measure(method, pure, args.steps, args.smoke)), flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
