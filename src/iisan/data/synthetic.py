"""Synthetic sequence data for tests and benchmarks: a tiny learnable dataset with cached
states (`tiny_data`, `tiny_caches`), Scientific-shaped sequences (`synthetic`) and a
`SequenceData` written as the preprocessed files `load_sequences` reads (`write_dataset`).
Its imports are absolute: `benchmarks/step_parity.py` loads this file by path beside another
version of the library, so that both versions train on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from iisan.data.sequences import SequenceData, left_pad

N_ITEMS, N_USERS, MAX_LEN = 40, 64, 6  # the tiny dataset


def walk(g, length: int) -> list[int]:
    """A user's items: mostly the next item id after the last one (something to learn)."""
    s = [int(g.integers(1, N_ITEMS + 1))]
    for _ in range(length - 1):
        s.append(int(g.integers(1, N_ITEMS + 1)) if g.random() < 0.2 else s[-1] % N_ITEMS + 1)
    return s


def tiny_data(item_order_hash="items-v1") -> SequenceData:
    """Users of 4..9 items, split as load_sequences does."""
    g = np.random.default_rng(0)
    full = [walk(g, int(g.integers(4, 10))) for _ in range(N_USERS)]
    train = [s[:-2] for s in full]
    counts = np.bincount([i for s in train for i in s], minlength=N_ITEMS + 1)
    counts[0] = 0
    with np.errstate(divide="ignore"):
        logp = np.log(counts / counts.sum()).astype(np.float32)
    logp[0] = 0.0
    hist = max(len(s) for s in full)
    t = torch.from_numpy
    return SequenceData(
        n_items=N_ITEMS, item_order_hash=item_order_hash,
        train=t(left_pad(train, MAX_LEN + 1)),
        valid_input=t(left_pad([s[:-2] for s in full], MAX_LEN)), valid_target=torch.tensor([s[-2] for s in full]),
        valid_history=t(left_pad([s[:-2] for s in full], hist)),
        test_input=t(left_pad([s[:-1] for s in full], MAX_LEN)), test_target=torch.tensor([s[-1] for s in full]),
        test_history=t(left_pad([s[:-1] for s in full], hist)),
        log_pop=t(logp), pop_count=t(counts.astype(np.int64)),
    )


def tiny_caches():
    """One text-like and one image-like field, 3 cached states each; row 0 (padding) is zero."""
    g = np.random.default_rng(1)
    caches = [g.standard_normal((N_ITEMS + 1, 3, d)).astype(np.float32) for d in (16, 12)]
    for c in caches:
        c[0] = 0
    return caches


def write_dataset(folder: Path, data: SequenceData) -> None:
    """`data` as the preprocessed files that load_sequences reads."""
    import polars as pl

    folder = Path(folder)
    folder.mkdir()
    unpad = lambda rows: [[int(i) for i in r if i] for r in rows.tolist()]  # noqa: E731
    full = [h + [int(v), int(t)] for h, v, t in zip(unpad(data.valid_history), data.valid_target, data.test_target)]
    pl.DataFrame({
        "train": unpad(data.train), "valid_input": unpad(data.valid_input), "valid_target": data.valid_target.numpy(),
        "test_input": unpad(data.test_input), "test_target": data.test_target.numpy(), "sequence": full,
    }).write_parquet(folder / "sequences.parquet")
    counts = data.pop_count.numpy()
    p = np.concatenate([[1.0], counts[1:] / counts.sum()])  # p[0] = 1: log p[0] = 0, as preprocess writes
    pl.DataFrame({"item": np.arange(data.n_items + 1), "count": counts, "p": p}).write_parquet(folder / "popularity.parquet")
    (folder / "stats.json").write_text(json.dumps({"items": data.n_items, "item_order_hash": data.item_order_hash}))


def synthetic_sequences(users=12076, items=20314, interactions=81711, seed=0) -> list[list[int]]:
    """Item sequences of Scientific's shape (window lengths 5..13, 81,711 interactions in all)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.poisson(interactions / users - 5, size=users) + 5, 5, 13)
    return [[int(i) for i in rng.integers(1, items + 1, size=n)] for n in lengths]


def synthetic(users=12076, items=20314, interactions=81711, seed=0) -> SequenceData:
    """Scientific-sized sequence data (random items: for timing, not for learning)."""
    return sequence_data(synthetic_sequences(users, items, interactions, seed), items, "synthetic")


def sequence_data(seqs: list[list[int]], items: int, item_order_hash: str, max_len: int = 10) -> SequenceData:
    """Leave-one-out windows of `max_len` items before each target, histories and popularity of
    full item sequences (as preprocessing and load_sequences make them)."""
    counts = np.bincount(np.concatenate([s[:-2] for s in seqs]), minlength=items + 1).astype(float)
    p = counts / counts[1:].sum()
    p[0] = 1.0
    with np.errstate(divide="ignore"):
        logp = np.log(p).astype(np.float32)
    t = torch.from_numpy
    return SequenceData(
        n_items=items, item_order_hash=item_order_hash,
        train=t(left_pad([s[:-2] for s in seqs], max_len + 1)),
        valid_input=t(left_pad([s[-(max_len + 2):-2] for s in seqs], max_len)),
        valid_target=t(np.array([s[-2] for s in seqs], dtype=np.int64)),
        valid_history=t(left_pad([s[:-2] for s in seqs], max_len + 3)),
        test_input=t(left_pad([s[-(max_len + 1):-1] for s in seqs], max_len)),
        test_target=t(np.array([s[-1] for s in seqs], dtype=np.int64)),
        test_history=t(left_pad([s[:-1] for s in seqs], max_len + 3)),
        log_pop=t(logp), pop_count=t(counts.astype(np.int64)),
    )
