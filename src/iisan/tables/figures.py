"""The paper's figures 4, 6 and 7 (PNG, with the numbers beside them as CSV)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from iisan.io import atomic_path, read_json  # noqa: E402
from iisan.tables import GROUP_ORDER, aggregate  # noqa: E402
from iisan.training.layerdrop import authors_stride  # noqa: E402


def _save(fig, out: Path) -> None:
    with atomic_path(out, ".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def _save_csv(df: pl.DataFrame, out: Path) -> None:
    with atomic_path(out, ".csv") as tmp:
        df.write_csv(tmp)


def fig4(rows: list[dict], metrics: list[Path], out: Path) -> pl.DataFrame:
    """Scaling: test HR@10 per text encoder, grouped PLM / base LLM / MoE LLM / 70B, group means."""
    df = aggregate(rows, metrics, "text encoder")
    datasets = df["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    colours = dict(zip(GROUP_ORDER, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for ax, ds in zip(axes[0], datasets):
        part = df.filter(pl.col("dataset") == ds)
        x, pos, labels = 0, [], []
        for group in GROUP_ORDER:
            g = part.filter(pl.col("group") == group)
            if g.is_empty():
                continue
            xs = list(range(x, x + g.height))
            ax.bar(xs, g["hr@10"].to_list(), color=colours[group], label=group)
            mean = g["hr@10"].mean()
            ax.hlines(mean, xs[0] - 0.4, xs[-1] + 0.4, colors="black", linestyles="dashed")
            ax.text(xs[-1] + 0.45, mean, f"{mean:.2f}", va="center", fontsize=7)
            pos += xs
            labels += g["text encoder"].to_list()
            x += g.height + 1
        ax.set_xticks(pos, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("HR@10 (%)")
        ax.set_title(f"IISAN-VA text encoder scaling, {ds} (dashed: group mean)")
        ax.legend(fontsize=8)
    _save(fig, out)
    return df


def cache_sizes(backbones: dict, measured: list[Path], items: int, cache_dtype: str = "auto", image_blocks: int = 6) -> pl.DataFrame:
    """Full vs dropped cache size per backbone: measured from manifests where a cache exists,
    and computed from the registry for all: items x stored states x width x the bytes of the
    storage dtype (config key cache.dtype resolved per backbone: fp32, fp16 for quantised ones).
    A full cache stores h[0..L] and, for ViT, the output after the final LayerNorm."""
    from iisan.encoders.backbones import BackboneSpec

    sizes = {}
    for name, b in backbones.items():
        spec = BackboneSpec.from_config(name, b)
        L, d = spec.layers, spec.hidden
        dtype = spec.cache_dtype(cache_dtype)
        width = np.dtype(dtype).itemsize
        kept = 1 + len(authors_stride(L, image_blocks)) if L >= image_blocks else L + 1
        sizes[name] = {
            "backbone": name,
            "layers": L,
            "hidden": d,
            "dtype": dtype,
            "computed_full_bytes": (items + 1) * (spec.output_layer + 1) * d * width,
            "computed_dropped_bytes": (items + 1) * kept * d * width,
            "measured_full_bytes": None,
            "measured_dropped_bytes": None,
        }
    for path in measured:
        m = read_json(path)
        entry = sizes.get(m["backbone"])
        if entry is None:
            continue
        key = "measured_dropped_bytes" if "pruned_from" in m else "measured_full_bytes"
        entry[key] = max(entry[key] or 0, m.get("bytes") or 0)
    return pl.DataFrame(list(sizes.values()))


def fig6(backbones: dict, measured: list[Path], items: int, out_png: Path, out_csv: Path, demo: bool,
         cache_dtype: str = "auto") -> pl.DataFrame:
    df = cache_sizes(backbones, measured, items, cache_dtype)
    df = df.filter(pl.col("backbone").is_in([n for n, b in backbones.items() if (b["source"] == "demo") == demo]))
    _save_csv(df, out_csv)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * df.height), 4))
    xs = range(df.height)
    full = df["computed_full_bytes"] / 2**30
    dropped = df["computed_dropped_bytes"] / 2**30
    ax.bar([x - 0.2 for x in xs], full.to_list(), 0.4, label="full cache (every stored state)")
    ax.bar([x + 0.2 for x in xs], dropped.to_list(), 0.4, label="dropped cache (LayerDrop states)")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), df["backbone"].to_list(), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("GiB (stored dtype, log scale)")
    ax.set_title(f"Cache size per backbone, {items:,} items (computed from the registry)")
    ax.legend(fontsize=8)
    _save(fig, out_png)
    return df


def fig7(rows: list[dict], metrics: list[Path], out_png: Path, out_csv: Path) -> pl.DataFrame:
    """Peak memory and training time per epoch with the full and the dropped cache."""
    df = aggregate(rows, metrics, "text encoder").select(
        "dataset", "text encoder", "cache", "seconds_per_epoch", "peak_memory_mb", "peak_memory_kind", "hr@10", "ndcg@10"
    )
    _save_csv(df, out_csv)
    names = df["text encoder"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], "peak_memory_mb", f"peak memory (MiB, {df['peak_memory_kind'][0]})"),
              (axes[1], "seconds_per_epoch", "s per training epoch"))
    for ax, col, label in panels:
        for off, cache in ((-0.2, "full"), (0.2, "dropped")):
            part = {r["text encoder"]: r[col] for r in df.filter(pl.col("cache") == cache).iter_rows(named=True)}
            ax.bar([i + off for i in range(len(names))], [part.get(n, 0) for n in names], 0.4, label=f"{cache} cache")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Full vs dropped cache per text encoder")
    _save(fig, out_png)
    return df


def fig5(df: pl.DataFrame, out: Path, time_batch: int | None = None) -> None:
    """Fig. 5: left, training time per epoch per method (at the largest profiled batch size, or
    `time_batch`); right, peak memory against batch size per method. `df` is efficiency.csv."""
    b = time_batch or int(df["batch_size"].max())
    at_b = df.filter(pl.col("batch_size") == b)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.bar(range(at_b.height), at_b["time_per_epoch_s"].to_list(), color="tab:blue")
    left.set_xticks(range(at_b.height), at_b["method"].to_list(), rotation=30, ha="right")
    left.set_ylabel("training time per epoch (s)")
    left.set_title(f"time per epoch, batch {b} ({at_b['device'][0]})")
    kind = df["peak_memory_kind"][0]
    for method in df["method"].unique(maintain_order=True).to_list():
        part = df.filter(pl.col("method") == method).sort("batch_size")
        right.plot(part["batch_size"].to_list(), (part["peak_memory_mb"] / 1024).to_list(), marker="o", label=method)
    right.set_xscale("log", base=2)
    sizes = sorted(set(df["batch_size"].to_list()))
    right.set_xticks(sizes, [str(b) for b in sizes])
    right.set_xlabel("batch size")
    right.set_ylabel(f"peak memory (GiB, {kind})")
    right.set_title("memory against batch size")
    right.legend(fontsize=8)
    _save(fig, out)
