"""Where an uncached IISAN step spends its time on a GPU (BERT-base + ViT-base, batch 32).

    PYTHONPATH=src:benchmarks python benchmarks/uncached_probe.py
"""

import json
import time

import torch

from iisan.data.synthetic import synthetic
from iisan.training.model import ModelConfig
from iisan.training.train import TrainConfig, Trainer

import baselines_speed as bs


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / n * 1000, 2)


def main():
    data = synthetic()
    source, mm = bs.build("iisan-uncached", data, None)
    # the eager step (no CUDA graph): each timed call is one whole step
    tr = Trainer(data, source, ModelConfig(method=mm), TrainConfig(batch_size=32, cuda_graphs=False), device="cuda")
    ids = next(tr.batches())
    flat = ids.reshape(-1)
    uniq = torch.unique(flat)
    real = uniq[uniq != 0]
    out = {"slots": flat.numel(), "unique_items": real.numel()}
    out["step_ms"] = timed(lambda: tr.train_step(ids))
    with tr.step.precision.autocast():
        out["gather_ms"] = timed(lambda: source.gather(flat))
        for t in source.towers:
            out[f"{t.spec.name}_forward_autocast_ms"] = timed(lambda t=t: t(real))
    print(json.dumps(out), flush=True)
    for t in source.towers:
        t.backbone.to(torch.bfloat16)
        with torch.no_grad():
            out[f"{t.spec.name}_forward_bf16_weights_ms"] = timed(lambda t=t: t(real))
        out[f"{t.spec.name}_attn"] = t.backbone.config._attn_implementation
    print(json.dumps(out), flush=True)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        with tr.step.precision.autocast():
            source.gather(flat)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
