"""Preprocessed sequences -> padded tensors for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iisan.io import read_json


def left_pad(seqs: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[r, length - len(s) :] = s
    return out


@dataclass
class SequenceData:
    n_items: int
    item_order_hash: str
    train: torch.Tensor  # (U, S) left-padded training windows, S = T + 1
    valid_input: torch.Tensor  # (U, T)
    valid_target: torch.Tensor  # (U,)
    valid_history: torch.Tensor  # (U, H) s[:-2]
    test_input: torch.Tensor  # (U, T)
    test_target: torch.Tensor  # (U,)
    test_history: torch.Tensor  # (U, H) s[:-1]
    log_pop: torch.Tensor  # (N+1,) log p, log p[0] = 0
    pop_count: torch.Tensor  # (N+1,) train counts

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    def to(self, device) -> SequenceData:
        return SequenceData(
            self.n_items,
            self.item_order_hash,
            *(getattr(self, f).to(device) for f in (
                "train", "valid_input", "valid_target", "valid_history",
                "test_input", "test_target", "test_history", "log_pop", "pop_count",
            )),
        )


def load_sequences(dataset_dir: Path, max_len: int = 10) -> SequenceData:
    """The dataset's windows for a user encoder of `max_len` (T) input positions: training
    windows of T + 1 items, evaluation inputs of the last T items before each target. T may be
    shorter than the windows preprocessing kept (preprocess.window - 3 items), never longer."""
    import polars as pl

    dataset_dir = Path(dataset_dir)
    stats = read_json(dataset_dir / "stats.json")
    kept = stats.get("max_len", stats["window"] - 3 if "window" in stats else None)
    if kept is not None and max_len > kept:
        raise ValueError(f"{dataset_dir}: model.max_len {max_len} is longer than the {kept} evaluation inputs this dataset "
                         f"was preprocessed with (preprocess.window {kept + 3}); set preprocess.window to at least {max_len + 3}")
    seq = pl.read_parquet(dataset_dir / "sequences.parquet")
    pop = pl.read_parquet(dataset_dir / "popularity.parquet").sort("item")
    full = seq["sequence"].to_list()
    hist_len = max(len(s) for s in full)
    p = pop["p"].to_numpy()
    with np.errstate(divide="ignore"):  # items never seen in training never become loss columns
        logp = np.log(p).astype(np.float32)
    return SequenceData(
        n_items=stats["items"],
        item_order_hash=stats["item_order_hash"],
        train=torch.from_numpy(left_pad(seq["train"].to_list(), max_len + 1)),
        valid_input=torch.from_numpy(left_pad(seq["valid_input"].to_list(), max_len)),
        valid_target=torch.from_numpy(seq["valid_target"].to_numpy().astype(np.int64)),
        valid_history=torch.from_numpy(left_pad([s[:-2] for s in full], hist_len)),
        test_input=torch.from_numpy(left_pad(seq["test_input"].to_list(), max_len)),
        test_target=torch.from_numpy(seq["test_target"].to_numpy().astype(np.int64)),
        test_history=torch.from_numpy(left_pad([s[:-1] for s in full], hist_len)),
        log_pop=torch.from_numpy(logp),
        pop_count=torch.from_numpy(pop["count"].to_numpy().astype(np.int64)),
    )
