"""The paper's published numbers (iisan/paper_values.yaml) and the columns that put them beside ours.

A table's CSV carries `paper hr@10`, `paper ndcg@10`, `Δ hr@10` and `Δ ndcg@10` (ours - paper,
percentage points) when it runs on the paper's datasets, matched by dataset, row key and (Table
VI) column; Table III's IISAN-VA row also carries the paper's relative improvement, Table VIII's
group means the paper's means.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import polars as pl
import yaml

from iisan.tables.build import METRICS

VALUES = Path(__file__).with_name("paper_values.yaml")
# the datasets the paper reports on, by the source kind that holds the real data
PAPER_DATASETS = {"Scientific": "amazon", "Instrument": "amazon", "Office": "amazon", "MicroLens": "microlens"}


@cache
def values() -> dict:
    """The file as read: {table: [{dataset, row, [column, group,] hr@10, ndcg@10}], ...}."""
    return yaml.safe_load(VALUES.read_text(encoding="utf-8"))


def cells(table: str) -> list[dict]:
    """The paper's rows of one table (with Table VIII's group means as rows keyed "mean:<group>")."""
    out = list(values().get(table) or [])
    if table == "table8":
        out += [dict(m, row=f"mean:{m['group']}") for m in values().get("table8_means") or []]
    return out


def on_paper_data(config: dict, datasets: list[str]) -> bool:
    """Whether a table's datasets are all the paper's, with their real data (not a demo twin)."""
    sources = config.get("dataset_sources") or {}
    return bool(datasets) and all(
        PAPER_DATASETS.get(d) is not None and (sources.get(d) or {}).get("kind") == PAPER_DATASETS[d] for d in datasets)


def attach(table: str, df: pl.DataFrame) -> pl.DataFrame:
    """`df` with the paper's numbers and our difference to them beside each metric (null where the
    paper has no such row)."""
    published = cells(table)
    on = ["dataset", "key"] + (["column"] if "column" in df.columns else [])
    if published:
        paper = pl.DataFrame([{"dataset": c["dataset"], "key": c["row"], **({"column": c.get("column")} if "column" in on else {}),
                               **{f"paper {m}": float(c[m]) for m in METRICS}} for c in published])
    else:
        paper = pl.DataFrame(schema={"dataset": pl.String, "key": pl.String, **{f"paper {m}": pl.Float64 for m in METRICS}})
    out = df.join(paper, on=on, how="left", maintain_order="left", nulls_equal=True)
    out = out.with_columns(*((pl.col(m) - pl.col(f"paper {m}")).round(2).alias(f"Δ {m}") for m in METRICS))
    if table == "table3" and "hr@10 VA over VS (%)" in out.columns:
        rel = {r["dataset"]: r for r in values().get("table3_relative_improvement") or []}
        out = out.with_columns(*(
            pl.when(pl.col("key") == "iisan-va").then(pl.col("dataset").replace_strict(
                {d: float(r[m]) for d, r in rel.items()}, default=None, return_dtype=pl.Float64)).otherwise(None)
            .alias(f"paper {m} VA over VS (%)") for m in METRICS))
    # the paper's columns follow each metric
    order = []
    for c in df.columns:
        order.append(c)
        if c in METRICS:
            order += [f"paper {c}", f"Δ {c}"]
        if c.endswith("VA over VS (%)") and f"paper {c}" in out.columns:
            order.append(f"paper {c}")
    return out.select(order)
