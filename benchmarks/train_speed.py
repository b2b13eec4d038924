"""Cached IISAN-VS training speed and peak memory at Scientific size.

Synthetic data with the real shapes: 12,076 users (window lengths 5..13 averaging like the real
81,711 interactions), 20,314 items, two fields with BERT-base-shaped caches (13 x 768, fp16),
scheme blocks6 (7 states per field), batch 64. Values are random: speed and memory do not depend
on them. Prints one JSON line per setting.

    PYTHONPATH=src python benchmarks/train_speed.py [--epochs 3] [--variants eager,graph,graph+compile] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
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

from gpu_profile import kernels, summary


def variants(text: str) -> list[dict]:
    """--variants: comma-separated settings, each `eager` or `graph` (the whole step as one CUDA
    graph), with `+compile` for compiled encoders (the library's `speed.compile`) or `+compile-all`
    for the whole forward, loss included, compiled as one (an experiment): eager,graph+compile."""
    out = []
    for v in text.split(","):
        base, _, extra = v.partition("+")
        if base not in ("eager", "graph") or extra not in ("", "compile", "compile-all"):
            raise SystemExit(f"--variants: {v!r} is not eager or graph, with or without +compile or +compile-all")
        out.append({"name": v, "cuda_graphs": base == "graph", "compile": extra == "compile", "compile_all": extra == "compile-all"})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variants", default="eager,graph",
                    help="settings to time side by side, e.g. graph,graph+compile (see variants())")
    ap.add_argument("--method", default="iisan")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one epoch: GPU busy time and top kernels")
    ap.add_argument("--top", type=int, default=25, help="kernels listed by --profile")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    data = synthetic(users=300, items=500, interactions=2000) if args.smoke else synthetic()
    rng = np.random.default_rng(1)
    layers = scheme_layers("blocks6", 12)
    width = 32 if args.smoke else 768
    full = [rng.standard_normal((data.n_items + 1, 13, width), dtype=np.float32).astype(np.float16) for _ in range(2)]
    caches = [c[:, layers] for c in full]
    for v in variants(args.variants):
        cfg = TrainConfig(max_epochs=args.epochs, patience=args.epochs, cuda_graphs=v["cuda_graphs"],
                          compile=v["compile"])
        if v["compile_all"]:  # the step's forward (encoders and loss) as one compiled function
            cfg = dataclasses.replace(cfg, compile=True, compile_forward=True)
        trainer = Trainer(data, CachedFeatures(caches), ModelConfig(method=args.method), cfg, start_run(cfg.seed, device))
        sync = trainer.sync
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(args.epochs):
            sync()
            t0 = time.perf_counter()
            losses.append(trainer.train_epoch())
            sync()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        val = trainer.evaluate("valid")
        sync()
        eval_s = time.perf_counter() - t0
        steps = -(-data.n_users // cfg.batch_size)
        steady = float(np.median(times[1:] if len(times) > 1 else times))
        row = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "method": args.method, "variant": v["name"], "batch": cfg.batch_size, "steps_per_epoch": steps,
            "epoch_seconds": [round(t, 3) for t in times], "steady_epoch_seconds": round(steady, 3),
            "ms_per_step": round(1000 * steady / steps, 3), "eval_seconds": round(eval_s, 3),
            "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
            "losses": [round(l, 5) for l in losses], "valid": val,
        }
        if args.profile:
            wall, events = kernels(trainer.train_epoch, device)
            row["profile"] = {"epoch_seconds": round(wall, 3), **summary(events, steps, top=args.top)}
        print(json.dumps(row), flush=True)
        del trainer
        gc.collect()


if __name__ == "__main__":
    main()
