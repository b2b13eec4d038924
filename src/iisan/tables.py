"""The paper's tables: which runs each row needs, and aggregating run metrics into CSV."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .io import atomic_path, read_json

# row label -> (method, scheme). "{default}" is the configured default scheme (blocks6 for
# 12-layer backbones: h[0] plus h[2], h[4], ..., h[12]).
TABLE6 = [  # Table VI: ablations (IISAN-VS column)
    ("IISAN-VS", "iisan", "{default}"),
    ("w/o LayerDrop", "iisan", "all"),
    ("w/o gate", "no-gate", "{default}"),
    ("frozen backbone", "frozen", "last"),
    ("w/o inter", "no-inter", "{default}"),
    ("w/o intra", "no-intra", "{default}"),
]
TABLE7 = [  # Table VII: number of LayerDrop blocks (12-layer backbones)
    ("2 blocks", "iisan", "blocks2"),
    ("3 blocks", "iisan", "blocks3"),
    ("4 blocks", "iisan", "blocks4"),
    ("6 blocks", "iisan", "blocks6"),
    ("12 blocks", "iisan", "all"),
]
METHOD_LABELS = {
    "iisan": "IISAN",
    "no-gate": "w/o gate",
    "no-inter": "w/o inter",
    "no-intra": "w/o intra",
    "frozen": "frozen backbone",
}

TABLES = {"table6": TABLE6, "table7": TABLE7}
ROW_HEADERS = {"table6": "variant", "table7": "blocks", "methods": "method"}


def table_rows(kind: str, default_scheme: str, methods: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(label, method, scheme) for each row of table `kind`."""
    if kind == "methods":
        return [(METHOD_LABELS[m], m, "last" if m == "frozen" else default_scheme) for m in methods or []]
    if kind not in TABLES:
        raise KeyError(f"unknown table {kind!r} (known: {sorted(TABLES)} and 'methods')")
    return [(label, m, default_scheme if s == "{default}" else s) for label, m, s in TABLES[kind]]


def build_table(kind: str, rows: list[dict], metrics: list[Path], out: Path) -> pl.DataFrame:
    """rows[i] = {dataset, label} describes metrics[i]; values are test-set percentages."""
    if len(rows) != len(metrics):
        raise ValueError(f"{len(rows)} rows but {len(metrics)} metrics files")
    header = ROW_HEADERS.get(kind, "row")
    records = []
    for row, path in zip(rows, metrics):
        m = read_json(path)
        records.append(
            {
                "dataset": row["dataset"],
                header: row["label"],
                "hr@10": round(100 * m["test"]["hr@10"], 2),
                "ndcg@10": round(100 * m["test"]["ndcg@10"], 2),
                "trainable_params": m["trainable_params"],
                "best_epoch": m["best_epoch"],
                "seconds_per_epoch": round(m["time_per_epoch_train_s"], 3),
            }
        )
    # mean over seeds, rows kept in the paper's order
    df = (
        pl.DataFrame(records)
        .group_by("dataset", header, maintain_order=True)
        .agg(
            pl.col("hr@10").mean().round(2),
            pl.col("ndcg@10").mean().round(2),
            pl.col("trainable_params").first(),
            pl.col("best_epoch").mean(),
            pl.col("seconds_per_epoch").mean().round(3),
            pl.len().alias("seeds"),
        )
    )
    if kind == "methods":
        df = df.select("dataset", header, "hr@10", "ndcg@10")
    with atomic_path(out, ".csv") as tmp:
        df.write_csv(tmp)
    return df
