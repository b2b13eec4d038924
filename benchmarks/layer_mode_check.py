"""Does a torch.compile mode for the backbone layers keep the results, and what does it do to the
validation pass?. BERT-base + ViT-base with random weights at
Scientific size (`baselines_speed.build`), batch 32 with every item slot, bf16, compiled as with
`--compile`: 12 training steps (their losses), two validation passes (metrics and seconds), then
10 more training steps (seconds per step) and the peak GPU memory.

    PYTHONPATH=src:benchmarks python benchmarks/layer_mode_check.py MODE METHOD  # MODE: default | reduce-overhead
    SMOKE=1 PYTHONPATH=src:benchmarks python benchmarks/layer_mode_check.py reduce-overhead bitfit  # CPU check
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

from iisan.data.synthetic import synthetic
from iisan.training.model import ModelConfig
from iisan.training.train import TrainConfig, Trainer, start_run

import baselines_speed as bs


def main(mode: str, method: str) -> dict:
    smoke = os.environ.get("SMOKE") == "1"
    bs.SMOKE = smoke
    dev = "cpu" if smoke else "cuda"
    torch.manual_seed(0)
    data = synthetic(users=300, items=500, interactions=2000) if smoke else synthetic()
    source, model_method = bs.build(method, data, torch.device(dev), "all")
    cfg = TrainConfig(batch_size=32, max_epochs=1, patience=1, precision="bf16", cuda_graphs=True, compile=True, item_slots="all")
    if mode != "default":
        cfg = dataclasses.replace(cfg, layer_mode=mode)
    trainer = Trainer(data, source, ModelConfig(method=model_method), cfg, start_run(cfg.seed, dev))

    def batches():
        while True:
            yield from trainer.batches()

    def timed(fn):
        trainer.sync()
        t0 = time.perf_counter()
        out = fn()
        trainer.sync()
        return out, round(time.perf_counter() - t0, 4)

    b = batches()
    losses, first = timed(lambda: [float(trainer.train_step(next(b))) for _ in range(12)])
    metrics, eval_s = timed(lambda: trainer.evaluate("valid"))
    metrics2, eval2_s = timed(lambda: trainer.evaluate("valid"))
    trainer.model.train()
    _, ten = timed(lambda: [trainer.train_step(next(b)) for _ in range(10)])
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
    return {"mode": mode, "method": method, "losses": losses, "metrics": metrics, "metrics2": metrics2,
            "first12_s": first, "eval_s": eval_s, "eval2_s": eval2_s, "step_after_eval_s": round(ten / 10, 4), "peak_gib": peak}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
