"""The paper's tables: which runs each row needs (`table_plan`), and aggregating run metrics
into CSV (`build_table`)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .io import atomic_path, read_json

TABLE6 = [  # Table VI: ablations (IISAN-VS column); "{default}" = config default_scheme
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
    "iisan-va": "IISAN-VA",
    "no-gate": "w/o gate",
    "no-inter": "w/o inter",
    "no-intra": "w/o intra",
    "frozen": "frozen backbone",
}
ROW_HEADERS = {"table4": "text encoder", "table6": "variant", "table7": "blocks", "table8": "selection", "methods": "method"}
KINDS = ("table4", "table6", "table7", "table8", "methods")
GROUP_ORDER = ["PLM", "base LLM", "MoE LLM", "70B"]


def _row(label, towers, method, scheme, cache="dropped", **extra) -> dict:
    return {"label": label, "towers": towers, "method": method, "scheme": scheme, "cache": cache, **extra}


def va_scheme(config: dict, text: str, image: str) -> str:
    """Group LayerDrop of IISAN-VA: the image tower keeps `default_scheme` (n blocks); the text
    tower keeps n blocks with the authors' stride (or the paper's eq. 5, `va_stride: eq5`)."""
    n_image = config["backbones"][image]["layers"] // 2
    kind = "eq5-" if config.get("va_stride", "authors") == "eq5" else "stride"
    text_layers = config["backbones"][text]["layers"]
    text_scheme = f"blocks{n_image}" if text_layers == config["backbones"][image]["layers"] else f"{kind}{n_image}"
    return f"{text_scheme}+{config['default_scheme']}"


def table_plan(kind: str, config: dict) -> list[dict]:
    """Rows of table `kind`: label, towers, method, scheme, cache (+ group, params_b)."""
    towers = config["towers"]
    default = config["default_scheme"]
    if kind == "table6":
        return [_row(l, towers, m, default if s == "{default}" else s) for l, m, s in TABLE6]
    if kind == "table7":
        return [_row(l, towers, m, s) for l, m, s in TABLE7]
    if kind == "methods":
        return [_row(METHOD_LABELS[m], towers, m, "last" if m == "frozen" else default) for m in config.get("methods", [])]
    if kind == "table4":
        t4 = config["table4"]
        image = t4["image_encoder"]
        rows = []
        for text in t4["text_encoders"]:
            b = config["backbones"][text]
            tw = [{"field": t4.get("text_field", "title"), "backbone": text}, {"field": t4.get("image_field", "image"), "backbone": image}]
            rows.append(_row(text, tw, "iisan-va", va_scheme(config, text, image), group=b.get("group", "PLM"), params_b=b.get("params_b")))
        return rows
    if kind == "table8":
        t8 = config["table8"]
        tw = [{"field": t8.get("text_field", "title"), "backbone": t8["text_encoder"]}, {"field": t8.get("image_field", "image"), "backbone": t8["image_encoder"]}]
        rows = []
        for text_sel, image_sel in t8["rows"]:
            rows.append(_row(f"text {text_sel} / image {image_sel}", tw, "iisan-va", f"{text_sel}+{image_sel}", text=text_sel, image=image_sel))
        return rows
    if kind == "fig7":
        out = []
        image = config["table4"]["image_encoder"]
        for text in config["fig7"]["text_encoders"]:
            tw = [{"field": "title", "backbone": text}, {"field": "image", "backbone": image}]
            for cache in ("full", "dropped"):
                out.append(_row(text, tw, "iisan-va", va_scheme(config, text, image), cache=cache))
        return out
    raise KeyError(f"unknown table {kind!r} (known: {', '.join(KINDS)})")


def _records(rows: list[dict], metrics: list[Path], header: str) -> pl.DataFrame:
    if len(rows) != len(metrics):
        raise ValueError(f"{len(rows)} rows but {len(metrics)} metrics files")
    records = []
    for row, path in zip(rows, metrics):
        m = read_json(path)
        records.append(
            {
                "dataset": row["dataset"],
                header: row["label"],
                "group": row.get("group"),
                "cache": row.get("cache", "dropped"),
                "hr@10": 100 * m["test"]["hr@10"],
                "ndcg@10": 100 * m["test"]["ndcg@10"],
                "trainable_params": m["trainable_params"],
                "best_epoch": m["best_epoch"],
                "seconds_per_epoch": m["time_per_epoch_train_s"],
                "peak_memory_mb": m["peak_memory_mb"],
                "peak_memory_kind": m["peak_memory_kind"],
                "cache_bytes": sum(c.get("bytes") or 0 for c in m.get("caches", [])),
            }
        )
    return pl.DataFrame(records)


def aggregate(rows: list[dict], metrics: list[Path], header: str) -> pl.DataFrame:
    """Mean over seeds, rows kept in the paper's order."""
    return (
        _records(rows, metrics, header)
        .group_by("dataset", header, "cache", maintain_order=True)
        .agg(
            pl.col("group").first(),
            pl.col("hr@10").mean().round(2),
            pl.col("ndcg@10").mean().round(2),
            pl.col("trainable_params").first(),
            pl.col("best_epoch").mean(),
            pl.col("seconds_per_epoch").mean().round(3),
            pl.col("peak_memory_mb").mean().round(1),
            pl.col("peak_memory_kind").first(),
            pl.col("cache_bytes").first(),
            pl.len().alias("seeds"),
        )
    )


def _write_csv(df: pl.DataFrame, out: Path) -> None:
    with atomic_path(out, ".csv") as tmp:
        df.write_csv(tmp)


def build_table(kind: str, rows: list[dict], metrics: list[Path], out: Path) -> pl.DataFrame:
    """rows[i] = {dataset, label, ...} describes metrics[i]; values are test-set percentages."""
    header = ROW_HEADERS.get(kind, "row")
    df = aggregate(rows, metrics, header)
    if kind == "methods":
        df = df.select("dataset", header, "hr@10", "ndcg@10")
    elif kind == "table4":
        # one row per text encoder, HR@10 / NDCG@10 per dataset, then group means
        wide = None
        for ds in df["dataset"].unique(maintain_order=True):
            part = df.filter(pl.col("dataset") == ds).select(
                "group", header, pl.col("hr@10").alias(f"{ds} hr@10"), pl.col("ndcg@10").alias(f"{ds} ndcg@10")
            )
            wide = part if wide is None else wide.join(part, on=["group", header], how="left", maintain_order="left")
        metric_cols = [c for c in wide.columns if c not in ("group", header)]
        means = (
            wide.group_by("group", maintain_order=True)
            .agg(*(pl.col(c).mean().round(2) for c in metric_cols))
            .with_columns(pl.concat_str(pl.lit("mean ("), pl.col("group"), pl.lit(")")).alias(header))
            .select(wide.columns)
        )
        df = pl.concat([wide, means])
    elif kind == "table8":
        df = df.select("dataset", header, "hr@10", "ndcg@10", "trainable_params")
        text = pl.col(header).str.extract(r"^text (\S+)")
        image = pl.col(header).str.extract(r"image (\S+)$")
        df = df.with_columns(text.alias("text selection"), image.alias("image selection"))
        mt = df.group_by("dataset", "text selection", maintain_order=True).agg(pl.col("hr@10").mean().round(2), pl.col("ndcg@10").mean().round(2))
        mi = df.group_by("dataset", "image selection", maintain_order=True).agg(pl.col("hr@10").mean().round(2), pl.col("ndcg@10").mean().round(2))
        means = pl.concat(
            [
                mt.select("dataset", pl.concat_str(pl.lit("mean text "), pl.col("text selection")).alias(header), "hr@10", "ndcg@10"),
                mi.select("dataset", pl.concat_str(pl.lit("mean image "), pl.col("image selection")).alias(header), "hr@10", "ndcg@10"),
            ]
        )
        df = pl.concat([df.select("dataset", header, "hr@10", "ndcg@10"), means])
    else:
        df = df.select("dataset", header, "hr@10", "ndcg@10", "trainable_params", "best_epoch", "seconds_per_epoch", "seeds")
    _write_csv(df, out)
    return df
