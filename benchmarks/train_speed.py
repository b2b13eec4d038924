"""Cached IISAN-VS training speed and peak memory at Scientific size (issue: foundation §7).

Synthetic data with the real shapes: 12,076 users (window lengths 5..13 averaging like the real
81,711 interactions), 20,314 items, two fields with BERT-base-shaped caches (13 x 768, fp16),
scheme blocks6 (7 states per field), batch 64. Values are random: speed and memory do not depend
on them. Prints one JSON line per setting.

    PYTHONPATH=src python benchmarks/train_speed.py [--epochs 3] [--no-graphs]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from iisan.data.sequences import SequenceData, left_pad
from iisan.layerdrop import scheme_layers
from iisan.model import ModelConfig
from iisan.train import TrainConfig, Trainer


def synthetic(users=12076, items=20314, interactions=81711, seed=0) -> SequenceData:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.poisson(interactions / users - 5, size=users) + 5, 5, 13)
    seqs = [list(rng.integers(1, items + 1, size=n)) for n in lengths]
    return sequence_data(seqs, items, "synthetic")


def sequence_data(seqs: list[list[int]], items: int, item_order_hash: str) -> SequenceData:
    """Leave-one-out windows, histories and popularity of full item sequences (as preprocessing
    and load_sequences make them)."""
    counts = np.bincount(np.concatenate([s[:-2] for s in seqs]), minlength=items + 1).astype(float)
    p = counts / counts[1:].sum()
    p[0] = 1.0
    with np.errstate(divide="ignore"):
        logp = np.log(p).astype(np.float32)
    t = torch.from_numpy
    return SequenceData(
        n_items=items, item_order_hash=item_order_hash,
        train=t(left_pad([s[:-2] for s in seqs], 11)),
        valid_input=t(left_pad([s[-12:-2] for s in seqs], 10)),
        valid_target=t(np.array([s[-2] for s in seqs], dtype=np.int64)),
        valid_history=t(left_pad([s[:-2] for s in seqs], 13)),
        test_input=t(left_pad([s[-11:-1] for s in seqs], 10)),
        test_target=t(np.array([s[-1] for s in seqs], dtype=np.int64)),
        test_history=t(left_pad([s[:-1] for s in seqs], 13)),
        log_pop=t(logp), pop_count=t(counts.astype(np.int64)),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--graphs", choices=["on", "off", "both"], default="both")
    ap.add_argument("--method", default="iisan")
    args = ap.parse_args()
    data = synthetic()
    rng = np.random.default_rng(1)
    layers = scheme_layers("blocks6", 12)
    full = [rng.standard_normal((data.n_items + 1, 13, 768), dtype=np.float32).astype(np.float16) for _ in range(2)]
    caches = [c[:, layers] for c in full]
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.graphs]
    for graphs in settings:
        cfg = TrainConfig(max_epochs=args.epochs, patience=args.epochs, cuda_graphs=graphs)
        trainer = Trainer(data, caches, ModelConfig(method=args.method), cfg)
        torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(args.epochs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(trainer.train_epoch())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        val = trainer.evaluate("valid")
        torch.cuda.synchronize()
        eval_s = time.perf_counter() - t0
        steps = -(-data.n_users // cfg.batch_size)
        print(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "method": args.method,
            "cuda_graphs": graphs, "batch": cfg.batch_size, "steps_per_epoch": steps,
            "epoch_seconds": [round(t, 3) for t in times],
            "steady_epoch_seconds": round(float(np.median(times[1:] if len(times) > 1 else times)), 3),
            "ms_per_step": round(1000 * float(np.median(times[1:] if len(times) > 1 else times)) / steps, 2),
            "eval_seconds": round(eval_s, 3), "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "losses": [round(l, 4) for l in losses], "valid": val,
        }), flush=True)


if __name__ == "__main__":
    main()
