"""Mixed precision of cached IISAN-VS training: bf16 autocast (ours) against the authors' fp16
autocast with a GradScaler and fp32 evaluation, and fp32.

Scientific-sized synthetic data with a learnable sequential signal, so that metrics mean
something: 12,076 users, 20,314 items in 200 groups; a user's next item is most often from the
group after the current one (else from a random group), items within a group by a Zipf
popularity; each item's cached states (BERT-base-shaped, 7 kept states x 768, stored fp32 as
the default cache) mix its group's vector, its own vector and noise, with a different random
projection per state. Every precision runs the same seeds with the workflow's speed settings
(CUDA graph step, compiled encoders). Prints one JSON line per run, then a summary.

    PYTHONPATH=src python benchmarks/precision.py [--epochs 30] [--seeds 12345 12346 12347]
    PYTHONPATH=src python benchmarks/precision.py --smoke --epochs 2 --seeds 1  # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

from iisan.data.sequences import SequenceData
from iisan.data.synthetic import sequence_data
from iisan.training.features import CachedFeatures
from iisan.training.model import ModelConfig
from iisan.training.train import TrainConfig, Trainer, start_run


def structured(users=12076, items=20314, groups=200, states=7, d=768, seed=0) -> tuple[SequenceData, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, size=items + 1)
    members = [np.flatnonzero(group[1:] == g) + 1 for g in range(groups)]
    zipf = [1.0 / np.arange(1, len(m) + 1) ** 0.8 for m in members]
    zipf = [w / w.sum() for w in zipf]
    lengths = np.clip(rng.poisson(81711 / users - 5, size=users) + 5, 5, 13)
    seqs = []
    for n in lengths:
        g = int(rng.integers(groups))
        s = []
        for _ in range(n):
            s.append(int(rng.choice(members[g], p=zipf[g])))
            g = (g + 1) % groups if rng.random() < 0.7 else int(rng.integers(groups))
        seqs.append(s)
    data = sequence_data(seqs, items, "structured")
    zg = rng.standard_normal((groups, 32), dtype=np.float32)
    zi = rng.standard_normal((items + 1, 32), dtype=np.float32)
    caches = []
    for _ in range(2):  # two fields
        c = np.empty((items + 1, states, d), dtype=np.float32)
        for k in range(states):
            a, b = (rng.standard_normal((32, d), dtype=np.float32) / 8 for _ in range(2))
            c[:, k] = zg[group] @ a + 0.5 * zi @ b + 0.3 * rng.standard_normal((items + 1, d), dtype=np.float32)
        c[0] = 0
        caches.append(c)
    return data, caches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[12345, 12346, 12347])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (which computes in fp32), to check the script")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    data, caches = structured(users=300, items=500, groups=20, d=32) if args.smoke else structured()
    print(json.dumps({"data_seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    runs = []
    for precision in args.precisions:
        for seed in args.seeds:
            cfg = TrainConfig(max_epochs=args.epochs, patience=args.epochs, seed=seed, precision=precision,
                              cuda_graphs=True, compile=not args.no_compile)
            trainer = Trainer(data, CachedFeatures(caches), ModelConfig(method="iisan"), cfg, start_run(seed, device))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            res = trainer.fit(progress=False)
            epochs = [h["epoch_seconds"] for h in res["history"]] if "epoch_seconds" in res["history"][0] else []
            run = {"precision": precision, "seed": seed, "test": res["test"], "valid": res["valid"],
                   "best_epoch": res["best_epoch"], "time_per_epoch_train_s": res["time_per_epoch_train_s"],
                   "time_per_epoch_with_eval_s": res.get("time_per_epoch_with_eval_s"),
                   "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else 0.0,
                   "losses": [round(h["loss"], 4) for h in res["history"][:3]] + [round(res["history"][-1]["loss"], 4)],
                   "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
            if epochs:
                run["epoch_seconds_first_last"] = [round(epochs[0], 3), round(epochs[-1], 3)]
            runs.append(run)
            print(json.dumps(run), flush=True)
            del trainer, res  # each run's peak memory is its own
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    summary = {}
    for precision in args.precisions:
        rs = [r for r in runs if r["precision"] == precision]
        hr = np.array([r["test"]["hr@10"] for r in rs]) * 100
        nd = np.array([r["test"]["ndcg@10"] for r in rs]) * 100
        summary[precision] = {"hr@10_mean": round(float(hr.mean()), 3), "hr@10_std": round(float(hr.std(ddof=1)), 3) if len(rs) > 1 else None,
                              "ndcg@10_mean": round(float(nd.mean()), 3), "ndcg@10_std": round(float(nd.std(ddof=1)), 3) if len(rs) > 1 else None,
                              "time_per_epoch_train_s": round(float(np.median([r["time_per_epoch_train_s"] for r in rs])), 3),
                              "last_epoch_s": round(float(np.median([r["epoch_seconds_first_last"][1] for r in rs])), 3),
                              "peak_memory_mib": max(r["peak_memory_mib"] for r in rs)}
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
