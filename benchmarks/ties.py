"""How often the target's score ties with another item's in full ranking, and what the tie rule
(iisan.training.metrics.rank_of_target, docs/method.md §7) changes in HR@10 / NDCG@10.

Two steps, so that the second runs where polars is missing (a GPU machine):

    # a preprocessed dataset folder (items.parquet, sequences.parquet, stats.json) -> one .npz
    PYTHONPATH=src python benchmarks/ties.py export resources/Scientific /tmp/ties/scientific.npz
    # titles through a sentence encoder, a training-free scorer, tie counts per precision
    PYTHONPATH=src python benchmarks/ties.py measure /tmp/ties/scientific.npz --encoder MODEL_DIR \
        [--device cuda] [--out ties.json]

`measure` reports:

* duplicates: items whose title, or whose first 30 tokens (the encoder's tokenizer, [CLS] title
  [SEP] as the caches tokenise), another item also has, and evaluation targets with an unmasked
  item of the same key. Any model whose item embedding is a function of those tokens alone
  (text-only runs) scores such items the same, so these ties are model-independent; whether the
  encoder's batches give equal inputs bitwise-equal embeddings is reported too.
* a training-free scorer: each title through the encoder (sentence-transformers, at most 30
  tokens, its own pooling and normalisation), as is (d = 384 for MiniLM-L6) and through a fixed
  random projection to D = 64 (the recommender's width); the user vector is the mean of the T
  input items' vectors; scores = user · item. Per precision (fp32; the vectors rounded to
  bf16 / fp16 with an fp32 dot product, what evaluation under bf16 autocast computes; the
  scores themselves rounded to bf16 / fp16): how many targets tie with another unmasked item,
  how many of those ties sit at the top 10, and HR@10 / NDCG@10 with ties broken optimistically
  (rank = 1 + #higher), by the rule (smaller id first), in expectation (every position among the
  tied items equally likely) and pessimistically.
* whether `rank_of_target` equals the target's position in `torch.argsort(descending=True)`
  (default, unstable) on this device, for the whole catalogue and for its first 151 columns
  (a catalogue small enough for PyTorch's small-sort path on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from iisan.training.metrics import MISS, masked_scores, rank_of_target

K = 10


def export(dataset_dir: Path, out: Path, max_len: int = 10) -> None:
    import polars as pl

    from iisan.data.sequences import load_sequences

    data = load_sequences(dataset_dir, max_len)
    items = pl.read_parquet(dataset_dir / "items.parquet").sort("item")
    assert items["item"].to_list() == list(range(1, data.n_items + 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        titles=np.array([""] + items["title"].to_list(), dtype=object),
        **{f"{s}_{f}": getattr(data, f"{s}_{f}").numpy() for s in ("valid", "test") for f in ("input", "target", "history")},
    )
    print(f"{out}: {data.n_items} items, {data.n_users} users")


def tie_counts(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor):
    """(#higher, #tied with a smaller id, #tied with a larger id, masked) per user."""
    s = masked_scores(scores, history)
    tgt = target.long().unsqueeze(1)
    t = s.gather(1, tgt)
    ids = torch.arange(s.shape[1], device=s.device).unsqueeze(0)
    eq = s == t
    return ((s > t).sum(1), (eq & (ids < tgt)).sum(1), (eq & (ids > tgt)).sum(1), torch.isinf(t.squeeze(1)))


def metrics_at(rank: torch.Tensor) -> tuple[float, float]:
    r = rank.double()
    hit = r <= K
    return float(hit.double().mean()), float(torch.where(hit, 1 / torch.log2(r + 1), torch.zeros_like(r)).mean())


def expected_metrics(g: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    """HR@K, NDCG@K when the target is equally likely at every rank g+1 .. g+e+1."""
    hr, nd = torch.zeros(g.shape, dtype=torch.float64), torch.zeros(g.shape, dtype=torch.float64)
    g, e = g.cpu(), e.cpu()
    for p in range(1, K + 1):
        inside = (g + 1 <= p) & (p <= g + e + 1)
        hr += inside.double()
        nd += inside.double() / math.log2(p + 1)
    return float((hr / (e + 1)).mean()), float((nd / (e + 1)).mean())


def duplicates(keys: list, target: np.ndarray, history: np.ndarray) -> dict:
    """Items whose key (title, or its first 30 tokens) another item shares, and targets with an
    unmasked item of the same key. keys[0] is the padding item."""
    counts = Counter(keys[1:])
    group: dict = {}
    for i, k in enumerate(keys[1:], start=1):
        group.setdefault(k, []).append(i)
    tied = []
    for tgt, hist in zip(target.tolist(), history):
        masked = set(hist.tolist())
        if tgt in masked:
            continue  # a masked target is a miss whatever its ties
        tied.append(sum(1 for i in group[keys[tgt]] if i != tgt and i not in masked))
    tied = np.array(tied)
    return {
        "items": len(keys) - 1,
        "items_sharing_a_key": sum(c for c in counts.values() if c > 1),
        "keys_shared": sum(1 for c in counts.values() if c > 1),
        "largest_group": max(counts.values()),
        "users": int(len(target)),
        "targets_scored": int(len(tied)),  # not masked
        "targets_with_same_key_item": int((tied > 0).sum()),
        "same_key_items_per_tied_target": float(tied[tied > 0].mean()) if (tied > 0).any() else 0.0,
    }


def token_keys(titles: list[str], encoder: str, max_tokens: int = 30) -> list:
    """Each title's first `max_tokens` token ids ([CLS] title [SEP], as the caches tokenise)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(encoder)
    ids = tok(titles, max_length=max_tokens, truncation=True)["input_ids"]
    return [tuple(i) for i in ids]


def encode(titles: list[str], encoder: str, device: str, batch: int) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(encoder, device=device).float()  # fp32 compute, whatever the stored weights
    model.max_seq_length = 30
    t0 = time.time()
    emb = model.encode(titles[1:], batch_size=batch, convert_to_tensor=True, normalize_embeddings=True).float()
    print(f"encoded {len(titles) - 1} titles in {time.time() - t0:.1f} s on {device}")
    return torch.cat([torch.zeros(1, emb.shape[1], device=emb.device), emb])


def equal_embeddings(emb: torch.Tensor, titles: list[str]) -> dict:
    group: dict[str, list[int]] = {}
    for i, t in enumerate(titles[1:], start=1):
        group.setdefault(t, []).append(i)
    pairs = same = 0
    for ids in group.values():
        for j in ids[1:]:
            pairs += 1
            same += bool(torch.equal(emb[ids[0]], emb[j]))
    # distinct titles whose embeddings are bitwise equal
    uniq = torch.unique(emb[1:], dim=0).shape[0]
    return {"duplicate_pairs": pairs, "bitwise_equal": same, "distinct_rows": int(uniq), "distinct_titles": len(group)}


PRECISIONS = {
    "fp32": lambda u, e: u @ e.T,
    "bf16 vectors, fp32 dot": lambda u, e: u.bfloat16().float() @ e.bfloat16().float().T,
    "fp16 vectors, fp32 dot": lambda u, e: u.half().float() @ e.half().float().T,
    "bf16 scores": lambda u, e: (u @ e.T).bfloat16(),
    "fp16 scores": lambda u, e: (u @ e.T).half(),
}


def measure_split(table: torch.Tensor, inp, tgt, hist, score, chunk=512) -> dict:
    G, LO, HI, M = [], [], [], []
    agree_full = agree_small = n_small = 0
    for s in range(0, inp.shape[0], chunk):
        i, t, h = inp[s : s + chunk], tgt[s : s + chunk], hist[s : s + chunk]
        x = table[i]
        u = x.sum(1) / (i != 0).sum(1, keepdim=True).clamp(min=1)
        sc = score(u, table)
        g, lo, hi, m = tie_counts(sc, t, h)
        r = rank_of_target(sc, t, h)
        assert torch.equal(r[~m], (g + lo + 1)[~m])
        # the authors' order: position in argsort(descending=True), default (unstable) sort
        ms = masked_scores(sc, h)[:, 1:]
        pos = (torch.argsort(ms, dim=1, descending=True) == (t.unsqueeze(1) - 1)).float().argmax(1) + 1
        agree_full += int((pos[~m] == r[~m]).sum())
        small = (t <= 150) & ~m  # targets among the first 150 items, ranked among those alone
        if small.any():
            h_small = torch.where(h[small] <= 150, h[small], torch.zeros_like(h[small]))
            r_small = rank_of_target(sc[small][:, :151], t[small], h_small)
            ms_small = masked_scores(sc[small][:, :151], h_small)[:, 1:]
            pos_small = (torch.argsort(ms_small, dim=1, descending=True) == (t[small].unsqueeze(1) - 1)).float().argmax(1) + 1
            agree_small += int((pos_small == r_small).sum())
            n_small += int(small.sum())
        G.append(g), LO.append(lo), HI.append(hi), M.append(m)
    g, lo, hi, m = (torch.cat(v).cpu() for v in (G, LO, HI, M))
    keep = ~m
    g, lo, hi = g[keep], lo[keep], hi[keep]
    e = lo + hi
    tied = e > 0
    n = int(m.numel())

    def full(rank_kept):  # masked targets count as misses in the mean
        r = torch.full((n,), MISS, dtype=torch.long)
        r[keep] = rank_kept
        return metrics_at(r)

    exp_hr, exp_nd = expected_metrics(g, e)
    frac = keep.double().mean().item()
    return {
        "users": n,
        "targets_tied": int(tied.sum()),
        "targets_tied_pct": 100 * float(tied.sum()) / n,
        "tied_others_mean_when_tied": float(e[tied].double().mean()) if tied.any() else 0.0,
        "ties_at_top10": int((tied & (g < K)).sum()),  # the tie decides the rank inside the top 10
        "ties_across_cut": int((tied & (g < K) & (g + e >= K)).sum()),  # ... and whether it is a hit
        "hr_ndcg_optimistic": full(g + 1),
        "hr_ndcg_rule": full(g + lo + 1),
        "hr_ndcg_expected": (exp_hr * frac, exp_nd * frac),
        "hr_ndcg_pessimistic": full(g + e + 1),
        "argsort_agrees": agree_full / max(int(keep.sum()), 1),
        "argsort_agrees_first_150_items": (agree_small / n_small) if n_small else None,
        "users_first_150_items": n_small,
    }


def argsort_order(device: str) -> dict:
    """Per catalogue size: the share of tied neighbours that `torch.argsort(descending=True)`
    (default, unstable) leaves in increasing index order, for one user's 1-D score vector (as
    the authors' evaluation sorts) and for 512 users at once; 1.0 = smaller index first."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for n in (151, 4096, 4097, 20314, 22785):
        row = {}
        for shape in ((n,), (512, n)):
            s = torch.randint(0, 64, shape, generator=g).float().to(device)
            o = torch.argsort(s, dim=-1, descending=True)
            so = s.gather(-1, o)
            tied = so[..., 1:] == so[..., :-1]
            row["1-D" if len(shape) == 1 else "512 rows"] = float((o[..., 1:] > o[..., :-1])[tied].float().mean())
        out[n] = row
    return out


def measure(npz: Path, encoder: str, device: str, batch: int) -> dict:
    z = np.load(npz, allow_pickle=True)
    titles = [str(t) for t in z["titles"]]
    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "argsort_order": argsort_order(device), "duplicates": {}, "scorer": {}}
    print("argsort: share of tied neighbours in increasing index order", json.dumps(out["argsort_order"]), flush=True)
    keys = {"title": titles, "first 30 tokens": token_keys(titles, encoder)}
    for split in ("valid", "test"):
        for kname, k in keys.items():
            out["duplicates"][f"{kname} | {split}"] = duplicates(k, z[f"{split}_target"], z[f"{split}_history"])
    emb = encode(titles, encoder, device, batch)
    out["embeddings"] = equal_embeddings(emb, titles)
    proj = torch.randn(emb.shape[1], 64, generator=torch.Generator().manual_seed(0)) / math.sqrt(emb.shape[1])
    tables = {f"d={emb.shape[1]}": emb, "D=64 projection": torch.nn.functional.normalize(emb @ proj.to(emb.device), dim=1)}
    tables["D=64 projection"][0] = 0
    for tname, table in tables.items():
        for pname, score in PRECISIONS.items():
            for split in ("valid", "test"):
                inp, tgt, hist = (torch.from_numpy(z[f"{split}_{f}"]).to(emb.device) for f in ("input", "target", "history"))
                res = measure_split(table, inp, tgt, hist, score)
                out["scorer"][f"{tname} | {pname} | {split}"] = res
                print(f"{tname:16s} {pname:24s} {split:5s} tied {res['targets_tied_pct']:6.2f}% top10 {res['ties_at_top10']:5d} "
                      f"HR opt/rule/exp/pess {res['hr_ndcg_optimistic'][0]:.4f} {res['hr_ndcg_rule'][0]:.4f} "
                      f"{res['hr_ndcg_expected'][0]:.4f} {res['hr_ndcg_pessimistic'][0]:.4f} argsort {res['argsort_agrees']:.4f} "
                      f"small {res['argsort_agrees_first_150_items']}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("dataset", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--max-len", type=int, default=10)
    m = sub.add_parser("measure")
    m.add_argument("npz", type=Path)
    m.add_argument("--encoder", required=True, help="a sentence-transformers model folder")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--batch", type=int, default=256)
    m.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.cmd == "export":
        export(a.dataset, a.out, a.max_len)
        return
    res = measure(a.npz, a.encoder, a.device, a.batch)
    print(json.dumps(res["duplicates"], indent=1), json.dumps(res["embeddings"]))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
