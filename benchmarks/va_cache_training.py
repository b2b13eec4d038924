"""Training time per epoch and peak GPU memory of IISAN-VA with a full vs a dropped
Llama-3-70B-shaped text cache (the paper's Fig. 7 claim).

Scientific size (12,076 users, 20,314 items), text cache 81 x 8192 (full) vs 7 x 8192
(dropped: h[0] + the authors' stride 5, 20, ..., 80), image cache ViT-base 13 x 768 (7 used),
fp16, batch 64, random values. Caches are created on the GPU.

    PYTHONPATH=src python benchmarks/va_cache_training.py [--epochs 3]
    PYTHONPATH=src python benchmarks/va_cache_training.py --smoke --epochs 2  # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

from iisan.data.synthetic import synthetic
from iisan.training.features import CachedFeatures
from iisan.training.layerdrop import scheme_layers
from iisan.training.model import ModelConfig
from iisan.training.train import TrainConfig, Trainer, start_run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    cuda = dev.type == "cuda"
    data = synthetic(users=300, items=500, interactions=2000) if args.smoke else synthetic()
    n = data.n_items + 1
    text_d, image_d = (64, 32) if args.smoke else (8192, 768)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    text_layers = scheme_layers("stride6", 80)
    image_layers = scheme_layers("blocks6", 12)
    for setting in ("dropped", "full"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        g = torch.Generator(device=dev).manual_seed(0)
        if setting == "full":
            text = torch.randn(n, 81, text_d, generator=g, device=dev, dtype=torch.float16)
            image = torch.randn(n, 13, image_d, generator=g, device=dev, dtype=torch.float16)
            index = [text_layers, image_layers]
        else:
            text = torch.randn(n, len(text_layers), text_d, generator=g, device=dev, dtype=torch.float16)
            image = torch.randn(n, len(image_layers), image_d, generator=g, device=dev, dtype=torch.float16)
            index = None
        cache_gib = (text.numel() + image.numel()) * 2 / 2**30
        cfg = TrainConfig(max_epochs=args.epochs)
        trainer = Trainer(data, CachedFeatures([text, image], index), ModelConfig(heads="va"), cfg, start_run(cfg.seed, dev))
        del text, image
        times = []
        for _ in range(args.epochs):
            sync()
            t = time.perf_counter()
            trainer.train_epoch()
            sync()
            times.append(time.perf_counter() - t)
        print(json.dumps({
            "device": torch.cuda.get_device_name() if cuda else "cpu", "cache": setting, "cache_gib_on_gpu": round(cache_gib, 2),
            "epoch_seconds": [round(t, 3) for t in times], "steady_epoch_seconds": round(float(np.median(times[1:])), 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, "trainable_params": trainer.trainable_parameters(),
        }), flush=True)
        del trainer
        gc.collect()


if __name__ == "__main__":
    main()
