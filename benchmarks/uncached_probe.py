"""Where an uncached IISAN step spends its time on a GPU (BERT-base + ViT-base, batch 32).

    PYTHONPATH=src:benchmarks python benchmarks/uncached_probe.py
    SMOKE=1 PYTHONPATH=src:benchmarks python benchmarks/uncached_probe.py  # tiny widths on the CPU, to check the script
"""

import json
import os
import time

import torch

from iisan.data.synthetic import synthetic
from iisan.training.model import ModelConfig
from iisan.training.train import TrainConfig, Trainer, start_run

import baselines_speed as bs

SMOKE = os.environ.get("SMOKE") == "1"
sync = (lambda: None) if SMOKE else torch.cuda.synchronize


def timed(fn, n=20):
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return round((time.perf_counter() - t0) / n * 1000, 2)


def main():
    bs.SMOKE = SMOKE
    data = synthetic(users=300, items=500, interactions=2000) if SMOKE else synthetic()
    source, mm = bs.build("iisan-uncached", data, None)
    # the eager step (no CUDA graph): each timed call is one whole step
    cfg = TrainConfig(batch_size=32, cuda_graphs=False)
    tr = Trainer(data, source, ModelConfig(method=mm), cfg, start_run(cfg.seed, "cpu" if SMOKE else "cuda"))
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
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (not SMOKE)
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        with tr.step.precision.autocast():
            source.gather(flat)
        sync()
    print(prof.key_averages().table(sort_by="cpu_time_total" if SMOKE else "cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
