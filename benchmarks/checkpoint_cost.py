"""Cost of the per-epoch training checkpoint (`Trainer.save_checkpoint`) for IISAN-VS at the
paper's width (BERT-base + ViT-base: two 768-wide towers, 7 cached states each): size on disk
and seconds per save, against the 0.7 s a cached epoch takes on an H100 (docs/benchmarks-history.md).

    python benchmarks/checkpoint_cost.py --saves 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from iisan.data.synthetic import N_ITEMS, tiny_data
from iisan.training.features import CachedFeatures
from iisan.training.model import ModelConfig
from iisan.training.train import FitState, TrainConfig, Trainer, start_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saves", type=int, default=20)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    caches = [np.random.default_rng(0).standard_normal((N_ITEMS + 1, 7, a.hidden)).astype(np.float32) for _ in range(2)]
    cfg = TrainConfig(max_epochs=1, batch_size=16)
    trainer = Trainer(tiny_data(), CachedFeatures(caches), ModelConfig(), cfg, start_run(cfg.seed, "cpu"))
    trainer.train_epoch()  # Adam state exists
    best = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}  # every tensor trains in a cached run
    state = FitState(epoch=1, best=0.1, best_epoch=1, best_state=best)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "checkpoint.pt"
        times = []
        for _ in range(a.saves):
            t0 = time.perf_counter()
            trainer.save_checkpoint(path, state)
            times.append(time.perf_counter() - t0)
        size = path.stat().st_size
    print(f"trainable parameters: {trainer.trainable_parameters():,}")
    print(f"checkpoint: {size / 2**20:.1f} MiB; save: median {np.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms "
          f"over {a.saves} saves")


if __name__ == "__main__":
    main()
