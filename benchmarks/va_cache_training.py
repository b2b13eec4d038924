"""Training time per epoch and peak GPU memory of IISAN-VA with a full vs a dropped
Llama-3-70B-shaped text cache (the paper's Fig. 7 claim).

Scientific size (12,076 users, 20,314 items), text cache 81 x 8192 (full) vs 7 x 8192
(dropped: h[0] + the authors' stride 5, 20, ..., 80), image cache ViT-base 13 x 768 (7 used),
fp16, batch 64, random values. Caches are created on the GPU.

    PYTHONPATH=src python benchmarks/va_cache_training.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

from iisan.data.synthetic import synthetic
from iisan.training.layerdrop import scheme_layers
from iisan.training.model import ModelConfig
from iisan.training.train import TrainConfig, Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    data = synthetic()
    n = data.n_items + 1
    text_layers = scheme_layers("stride6", 80)
    image_layers = scheme_layers("blocks6", 12)
    for setting in ("dropped", "full"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator(device="cuda").manual_seed(0)
        if setting == "full":
            text = torch.randn(n, 81, 8192, generator=g, device="cuda", dtype=torch.float16)
            image = torch.randn(n, 13, 768, generator=g, device="cuda", dtype=torch.float16)
            index = [text_layers, image_layers]
        else:
            text = torch.randn(n, len(text_layers), 8192, generator=g, device="cuda", dtype=torch.float16)
            image = torch.randn(n, len(image_layers), 768, generator=g, device="cuda", dtype=torch.float16)
            index = None
        cache_gib = (text.numel() + image.numel()) * 2 / 2**30
        trainer = Trainer(data, [text, image], ModelConfig(heads="va"), TrainConfig(max_epochs=args.epochs), layer_index=index)
        del text, image
        times = []
        for _ in range(args.epochs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            trainer.train_epoch()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(json.dumps({
            "device": torch.cuda.get_device_name(), "cache": setting, "cache_gib_on_gpu": round(cache_gib, 2),
            "epoch_seconds": [round(t, 3) for t in times], "steady_epoch_seconds": round(float(np.median(times[1:])), 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "trainable_params": trainer.trainable_parameters(),
        }), flush=True)
        del trainer
        gc.collect()


if __name__ == "__main__":
    main()
