"""The tables' builders: run metrics aggregated into data frames, one function per table layout
(the registry, `iisan.tables.entries`, names each table's builder), and `build_efficiency`."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from iisan.config import config_hash
from iisan.io import DamagedFileError, atomic_path, read_json, set_aside
from iisan.training import methods

GROUP_ORDER = ["PLM", "base LLM", "MoE LLM", "70B"]
METRICS = ("hr@10", "ndcg@10")
DAMAGED_NEXT = "rerun the workflow: it redoes the job that writes this file, then this table"
# what happens after another run's file was moved aside, by what `read_runs` reads
FOREIGN_NEXT = {"metrics files": "rerun the workflow: it retrains this run, then builds this table or figure",
                "profiles": "rerun the workflow: it profiles this run again, then builds this table or figure"}


class ForeignRunError(DamagedFileError):
    """A run's file (metrics.json, a profile) that holds another run's result than the one its
    row stands for; it has been moved aside (the message says where and what happens next)."""


def describe_experiment(exp: dict) -> str:
    """A run's identity in words: dataset, towers, method, scheme, cache and seed."""
    try:
        towers = "+".join(f"{t['field']}@{t['backbone']}" for t in exp.get("towers") or []) or "id"
        return (f"dataset {exp.get('dataset')}, towers {towers}, method {exp.get('method')}, scheme {exp.get('scheme')}, "
                f"cache {exp.get('cache')}, seed {(exp.get('train') or {}).get('seed')}")
    except (AttributeError, KeyError, TypeError):
        return "an experiment in an unknown form"


def foreign_run(row: dict, m) -> str | None:
    """Why a run's file `m` (parsed metrics.json or profile) is not the run that `row` stands
    for, or None. The row's `config_hash` (`iisan.tables.plan_runs`: the hash of the experiment
    the config gives its run, `iisan.config.Experiment.hash`, i.e. of the train rule's params
    `experiment`) must equal the hash of the file's `experiment` (the job writes the experiment
    it ran, `Experiment.to_dict`) and its `config_hash` field, where it has one; a profile's
    `batch_size` must be its row's. A row without `config_hash` is not checked."""
    expected = row.get("config_hash")
    if expected is None:
        return None
    exp = m.get("experiment") if isinstance(m, dict) else None
    if not isinstance(exp, dict):
        return f"it records no experiment (field 'experiment'), expected experiment {expected}"
    found = config_hash(exp)
    recorded = m.get("config_hash", found)
    if recorded != found:
        return (f"its field 'config_hash' is {recorded!r}, but its own field 'experiment' hashes to {found} "
                "(the file was edited or pieced together)")
    if found != expected:
        return (f"expected experiment {expected} (the config's run for row {row.get('label')!r}, dataset "
                f"{row.get('dataset')}, seed {row.get('seed')}), found experiment {found} ({describe_experiment(exp)})")
    if "batch_size" in row and m.get("batch_size") != row["batch_size"]:
        return f"expected batch size {row['batch_size']}, found {m.get('batch_size')!r}"
    return None


def read_runs(rows: list[dict], paths: list[Path], what: str = "metrics files"):
    """(row, its run's JSON) pairs; rows[i] describes paths[i]. A file that is not valid JSON,
    or that holds another run's result than its row's (`foreign_run`), is moved aside
    (``<name>.damaged-<UTC time>``) and named in the error: the workflow's next run redoes the
    job that writes it. Every file is checked before the error, so that one rerun redoes them all."""
    if len(rows) != len(paths):
        raise ValueError(f"{len(rows)} rows but {len(paths)} {what}")
    out, errors = [], []
    for row, path in zip(rows, paths):
        try:
            m = read_json(path, then=DAMAGED_NEXT)
            why = foreign_run(row, m)
            if why is not None:
                dst = set_aside(path, f"another run's result: {why}")
                raise ForeignRunError(f"{path}: another run's result: {why}; moved aside to {dst}; "
                                      f"{FOREIGN_NEXT.get(what, DAMAGED_NEXT)}")
        except DamagedFileError as err:
            errors.append(err)
            continue
        out.append((row, m))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        kind = ForeignRunError if all(isinstance(e, ForeignRunError) for e in errors) else DamagedFileError
        raise kind(f"{len(errors)} of {len(paths)} {what} cannot be used and were moved aside:\n" + "\n".join(map(str, errors)))
    return out


def _records(rows: list[dict], metrics: list[Path], header: str) -> pl.DataFrame:
    records = []
    for row, m in read_runs(rows, metrics):
        records.append(
            {
                "dataset": row["dataset"],
                header: row["label"],
                "key": row.get("key", row["label"]),
                "column": row.get("column"),
                "group": row.get("group"),
                "cache": row.get("cache", "dropped"),
                "hr@10": 100 * m["test"]["hr@10"],
                "ndcg@10": 100 * m["test"]["ndcg@10"],
                "seed": row.get("seed", m.get("seed")),
                "trainable_params": m["trainable_params"],
                "best_epoch": m["best_epoch"],
                "seconds_per_epoch": m["time_per_epoch_train_s"],
                "seconds_per_epoch_with_eval": m.get("time_per_epoch_with_eval_s"),
                "peak_memory_mb": m["peak_memory_mb"],
                "peak_memory_kind": m["peak_memory_kind"],
                "item_slots": ((m.get("experiment") or {}).get("train") or {}).get("item_slots"),
                "cache_bytes": sum(c.get("bytes") or 0 for c in m.get("caches", [])),
            }
        )
    return pl.DataFrame(records, schema_overrides={"seconds_per_epoch_with_eval": pl.Float64, "seed": pl.Int64, "column": pl.String,
                                                   "group": pl.String, "item_slots": pl.String})


def aggregate(rows: list[dict], metrics: list[Path], header: str) -> pl.DataFrame:
    """Mean over seeds, rows kept in the paper's order."""
    return aggregate_records(_records(rows, metrics, header), header)


def aggregate_records(records: pl.DataFrame, header: str) -> pl.DataFrame:
    """`aggregate` of records already read (`_records`)."""
    return (
        records
        .group_by("dataset", "column", header, "cache", maintain_order=True)
        .agg(
            pl.col("key").first(),
            pl.col("group").first(),
            pl.col("hr@10").mean().round(2),
            pl.col("ndcg@10").mean().round(2),
            pl.col("trainable_params").first(),
            pl.col("best_epoch").mean(),
            pl.col("seconds_per_epoch").mean().round(3),
            pl.col("seconds_per_epoch_with_eval").mean().round(3),
            pl.col("peak_memory_mb").mean().round(1),
            pl.col("peak_memory_kind").first(),
            pl.col("cache_bytes").first(),
            pl.len().alias("seeds"),
        )
    )


def write_csv(df: pl.DataFrame, out: Path) -> None:
    with atomic_path(out, ".csv") as tmp:
        df.write_csv(tmp)


def build_plain(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    """One row per planned row and dataset: metrics, parameters, best epoch, time, seeds."""
    return aggregate(rows, metrics, header).select(
        "dataset", header, "key", "hr@10", "ndcg@10", "trainable_params", "best_epoch", "seconds_per_epoch", "seeds")


def build_methods_table(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    """Mean and standard deviation over seeds; a row with `versus` also gets its mean difference
    to that row over the seeds both ran, and the paired t-test's p-value."""
    rec = _records(rows, metrics, header)
    df = rec.group_by("dataset", header, maintain_order=True).agg(
        pl.col("key").first(),
        *(x for m in METRICS for x in (pl.col(m).mean().round(2), pl.col(m).std().round(2).alias(f"{m} std"))),
        pl.col("best_epoch").mean().round(1),
        pl.col("trainable_params").first(),
        pl.len().alias("seeds"),
    )
    versus = {r["label"]: r.get("versus") for r in rows}
    out = []
    for r in df.iter_rows(named=True):
        other = versus.get(r[header])
        r["versus"] = other
        for m in METRICS:
            d = p = None
            if other:
                a = {s: v for s, v in rec.filter((pl.col("dataset") == r["dataset"]) & (pl.col(header) == r[header]))
                     .select("seed", m).iter_rows()}
                b = {s: v for s, v in rec.filter((pl.col("dataset") == r["dataset"]) & (pl.col(header) == other))
                     .select("seed", m).iter_rows()}
                shared = sorted(a.keys() & b.keys())
                if shared:
                    d = round(sum(a[s] - b[s] for s in shared) / len(shared), 2)
                    p = paired_ttest([a[s] for s in shared], [b[s] for s in shared])
                    p = None if p != p else round(p, 4)
            r[f"Δ {m} vs versus"], r[f"p {m}"] = d, p
        out.append(r)
    return pl.DataFrame(out, schema_overrides={"versus": pl.String, **{f"{x} {m}{y}": pl.Float64 for m in METRICS
                                                                      for x, y in (("Δ", " vs versus"), ("p", ""))}})


def build_table9(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    return aggregate(rows, metrics, header).select("dataset", "group", header, "key", "hr@10", "ndcg@10", "trainable_params", "seeds")


def _group_means(df: pl.DataFrame, header: str, groups: list[str] | None = None, min_rows: int = 2) -> pl.DataFrame:
    """Per dataset, the mean of each group with at least `min_rows` rows (of `groups` when given),
    as rows labelled "mean (<group>)" with the key "mean:<group>"."""
    g = df if groups is None else df.filter(pl.col("group").is_in(groups))
    means = g.group_by("dataset", "group", maintain_order=True).agg(
        pl.len().alias("rows"), pl.col("hr@10").mean().round(2), pl.col("ndcg@10").mean().round(2))
    return means.filter(pl.col("rows") >= min_rows).select(
        "dataset", "group", pl.concat_str(pl.lit("mean ("), pl.col("group"), pl.lit(")")).alias(header),
        pl.concat_str(pl.lit("mean:"), pl.col("group")).alias("key"), "hr@10", "ndcg@10")


def build_table4(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    """One row per text encoder (then the image-scaling rows) and dataset, then the means of the
    text-encoder groups (PLM, base LLM, MoE LLM, 70B)."""
    df = aggregate(rows, metrics, header).select("dataset", "group", header, "key", "hr@10", "ndcg@10", "trainable_params", "seeds")
    return pl.concat([df, _group_means(df, header, GROUP_ORDER, min_rows=1)], how="diagonal_relaxed")


def build_table8(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    """Rows grouped by the blocks each tower keeps ("24+12", "12+6", ...); the mean of every group
    with more than one row follows the rows."""
    df = aggregate(rows, metrics, header).select("dataset", "group", header, "key", "hr@10", "ndcg@10", "trainable_params", "seeds")
    return pl.concat([df, _group_means(df, header)], how="diagonal_relaxed")


def build_table6(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    """The ablations, one column (IISAN-VS, IISAN-VA) after the other."""
    return aggregate(rows, metrics, header).select(
        "dataset", "column", header, "key", "hr@10", "ndcg@10", "trainable_params", "best_epoch", "seeds")


def build_gates(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    """The learned gates of each run's best checkpoint (metrics.json "gates"): per run and gated
    part (a tower's intra-modal SAN by its field; "inter", the inter-modal SAN, whose gate is the
    image's share against the text) the mean gate value over its blocks and seeds, its range, and
    the number of blocks (each block's value is in the run's metrics.json)."""
    recs = []
    for row, m in read_runs(rows, metrics):
        for part, g in (m.get("gates") or {}).items():
            recs.append({"dataset": row["dataset"], header: row["label"], "key": row.get("key", row["label"]), "part": part,
                         "seed": row.get("seed"), "mean": g["mean"], "blocks": g["values"]})
    if not recs:
        return pl.DataFrame(schema={"dataset": pl.String, header: pl.String, "key": pl.String, "part": pl.String,
                                    "gate mean": pl.Float64, "gate min": pl.Float64, "gate max": pl.Float64, "blocks": pl.UInt32,
                                    "seeds": pl.UInt32})
    df = pl.DataFrame(recs)
    return df.group_by("dataset", header, "key", "part", maintain_order=True).agg(
        pl.col("mean").mean().round(4).alias("gate mean"),
        pl.col("blocks").list.min().min().round(4).alias("gate min"),
        pl.col("blocks").list.max().max().round(4).alias("gate max"),
        pl.col("blocks").first().list.len().alias("blocks"),
        pl.len().alias("seeds"),
    )


# --- Table V: our MicroLens runs beside the benchmark's published rows -------------------------
RERUN = "rerun here"  # the source column of the rows this workflow trained
CITED = "cited:"  # the key prefix of a cited row (`CITED + method`)
CITED_KEYS = ("group", "method", "hr@10", "ndcg@10")


def read_cited(path: str | Path) -> dict:
    """A file of published rows (config/cited/table5.yaml): `source` (where the numbers are
    printed), `dataset` (what they were measured on) and `rows`, each {group, method, hr@10,
    ndcg@10} in percent. Errors name the file and the row."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the cited rows ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in ("source", "dataset")):
        raise ValueError(f"{path}: expected a mapping with the strings 'source' and 'dataset' and a list 'rows'")
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: 'rows' must be a list of {{{', '.join(CITED_KEYS)}}}")
    for i, r in enumerate(rows):
        where = f"{path}: rows[{i}]"
        if not isinstance(r, dict) or set(r) != set(CITED_KEYS):
            raise ValueError(f"{where}: expected exactly the keys {', '.join(CITED_KEYS)}, got {r!r}")
        for k in ("hr@10", "ndcg@10"):
            v = r[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
                raise ValueError(f"{where}.{k}: expected a percentage between 0 and 100, got {v!r}")
    return data


def build_table5(rows: list[dict], metrics: list[Path], header: str, extra=()) -> pl.DataFrame:
    """Table V: the benchmark's published rows (source: the citation; dataset: the published
    one; `extra` holds the cited file, if any), then this workflow's reruns on the configured
    MicroLens dataset (source: rerun here)."""
    cited = read_cited(extra[0]) if extra else None
    rec = _records(rows, metrics, header)
    ours = aggregate_records(rec, header).select(
        "dataset", "group", header, "key", "hr@10", "ndcg@10", pl.lit(RERUN).alias("source"),
        "trainable_params", "best_epoch", "seeds",
    )
    if not cited or not cited["rows"]:
        return ours
    # the benchmark's best row (highest HR@10): each rerun row's one-sample t-test of its seeds
    # against it, as the benchmark's per-seed results are not published
    top = max(cited["rows"], key=lambda r: r["hr@10"])
    ours = ours.with_columns(*(pl.Series(f"{m} p (vs cited best)", [
        one_sample_ttest(rec.filter((pl.col("dataset") == r["dataset"]) & (pl.col(header) == r[header]))[m].to_list(), top[m])
        for r in ours.iter_rows(named=True)], dtype=pl.Float64).round(4) for m in METRICS))
    published = pl.DataFrame(
        [{"dataset": cited["dataset"], "group": r["group"], header: r["method"], "key": CITED + r["method"],
          "hr@10": float(r["hr@10"]), "ndcg@10": float(r["ndcg@10"]), "source": f"cited: {cited['source']}"} for r in cited["rows"]]
    )
    return pl.concat([published, ours], how="diagonal_relaxed").select(ours.columns)


# --- Table III and Fig. 5: baselines and efficiency (docs/method.md §8-9) ----------------------


def tpme(time_s: list[float], params: list[float], memory: list[float]) -> list[float]:
    """TPME = 0.45 t_norm + 0.1 p_norm + 0.45 m_norm, min-max normalised over the compared
    methods (docs/method.md §9); lower is better. A column with one distinct value normalises to 0."""

    def norm(xs):
        lo, hi = min(xs), max(xs)
        return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]

    return [0.45 * t + 0.1 * p + 0.45 * m for t, p, m in zip(norm(time_s), norm(params), norm(memory))]


def paired_ttest(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p-value of a vs b (scipy); nan with fewer than 2 pairs."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired t-test needs the same seeds on both sides ({len(a)} vs {len(b)} runs)")
    if len(a) < 2:
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def one_sample_ttest(a: list[float], value: float) -> float | None:
    """Two-sided one-sample t-test p-value of a against `value` (scipy); None with fewer than 2
    values or no spread."""
    from scipy import stats

    if len(a) < 2 or len(set(a)) < 2:
        return None
    return float(stats.ttest_1samp(a, value).pvalue)


def build_table3(rows: list[dict], metrics: list[Path], header: str = "method", extra=(), alpha: float = 0.05) -> pl.DataFrame:
    """Methods x datasets: test HR@10 / NDCG@10 (%, mean over seeds); on the IISAN-VA row the
    paper's relative improvement of IISAN-VA over IISAN-VS, (VA - VS) / VA, and the paired t-test
    of VA against VS over the shared seeds ("*" where VA is better at p < alpha); each row's
    difference to FFT, (row - FFT) / FFT; the efficiency columns with TPME over the non-ID
    methods, and `item_slots`, the accounting they were measured with (the runs' train.item_slots:
    `real` skips the padding slots of the backbones in the loop, `all` counts every slot as the
    paper's ratios and Fig. 5 do)."""
    rec = _records(rows, metrics, header).with_columns(pl.Series("token", [r.get("token", r["label"]) for r in rows]))
    df = (
        rec.group_by("dataset", header, maintain_order=True)
        .agg(
            pl.col("token").first(),
            pl.col("key").first(),
            pl.col("hr@10").mean().round(2),
            pl.col("ndcg@10").mean().round(2),
            pl.col("seconds_per_epoch").mean().round(3),
            pl.col("seconds_per_epoch_with_eval").mean().round(3),
            pl.col("peak_memory_mb").mean().round(1),
            pl.col("peak_memory_kind").first(),
            pl.col("item_slots").first(),
            pl.col("trainable_params").first(),
            pl.col("cache_bytes").first(),
            pl.len().alias("seeds"),
        )
    )
    parts, tokens = [], set(methods.row_tokens())
    for ds in df["dataset"].unique(maintain_order=True):
        part = df.filter(pl.col("dataset") == ds)
        fft = part.filter(pl.col("token") == "fft")
        vs_row = part.filter(pl.col("token") == "iisan")
        is_va = pl.col("token") == "iisan-va"
        for m in ("hr@10", "ndcg@10"):
            base = fft[m][0] if fft.height else None
            vs_m = vs_row[m][0] if vs_row.height else None
            part = part.with_columns(
                (((pl.col(m) - base) / base * 100).round(2) if base else pl.lit(None, dtype=pl.Float64)).alias(f"{m} vs FFT (%)"),
                pl.when(is_va & pl.lit(vs_m is not None)).then((pl.col(m) - (vs_m or 0.0)) / pl.col(m) * 100).otherwise(None)
                .round(2).alias(f"{m} VA over VS (%)"),
            )
            # IISAN-VA vs IISAN-VS, paired by seed
            runs = rec.filter(pl.col("dataset") == ds)
            va = runs.filter(pl.col("token") == "iisan-va").sort("seed")
            vs = runs.filter(pl.col("token") == "iisan").sort("seed")
            shared = sorted(set(va["seed"].to_list()) & set(vs["seed"].to_list()))
            p, better = float("nan"), False
            if shared:
                a = va.filter(pl.col("seed").is_in(shared))[m].to_list()
                b = vs.filter(pl.col("seed").is_in(shared))[m].to_list()
                p = paired_ttest(a, b)
                better = sum(a) > sum(b)
            mark = "*" if (p == p and p < alpha and better) else ""
            part = part.with_columns(
                pl.when(is_va).then(pl.lit(p)).otherwise(None).round(4).alias(f"{m} p (VA vs VS)"),
                pl.when(is_va).then(pl.lit(mark)).otherwise(pl.lit("")).alias(f"{m} sig"),
            )
        id_rows = [t for t in part["token"].to_list() if t in tokens and methods.row(t)[0].is_id]
        content = part.filter(~pl.col("token").is_in(id_rows))
        if content.height:
            scores = tpme(content["seconds_per_epoch"].to_list(), content["trainable_params"].to_list(),
                          content["peak_memory_mb"].to_list())
            tp = dict(zip(content[header].to_list(), scores))
            part = part.with_columns(pl.col(header).replace_strict(tp, default=None, return_dtype=pl.Float64).round(4).alias("TPME"))
        else:
            part = part.with_columns(pl.lit(None, dtype=pl.Float64).alias("TPME"))
        parts.append(part)
    out = pl.concat(parts, how="diagonal_relaxed")
    return out.select(
        "dataset", header, "key", "hr@10", "hr@10 sig", "ndcg@10", "ndcg@10 sig", "hr@10 VA over VS (%)", "ndcg@10 VA over VS (%)",
        "hr@10 vs FFT (%)", "ndcg@10 vs FFT (%)",
        "hr@10 p (VA vs VS)", "ndcg@10 p (VA vs VS)", "seconds_per_epoch", "seconds_per_epoch_with_eval", "peak_memory_mb",
        "peak_memory_kind", "item_slots", "trainable_params", "TPME", "cache_bytes", "seeds",
    )


def build_efficiency(rows: list[dict], profiles: list[Path], out: Path) -> pl.DataFrame:
    """Profiles (one per method and batch size) -> efficiency.csv with TPME per batch size over
    the methods (`iisan.tables.figures.fig5` draws it)."""
    recs = []
    for row, m in read_runs(rows, profiles, "profiles"):
        recs.append(
            {
                "dataset": row.get("dataset"),
                "method": row["label"],
                "token": row.get("token", row["label"]),
                "batch_size": m["batch_size"],
                "time_per_epoch_s": m["time_per_epoch_train_s"],
                "time_source": m["time_source"],
                "peak_memory_mb": m["peak_memory_mb"],
                "peak_memory_kind": m["peak_memory_kind"],
                "trainable_params": m["trainable_params"],
                "total_params": m["total_params"],
                "cache_bytes": m.get("cache_bytes", 0),
                "device": m["device"],
            }
        )
    df = pl.DataFrame(recs)
    parts = []
    for _, part in df.group_by("dataset", "batch_size", maintain_order=True):
        scores = tpme(part["time_per_epoch_s"].to_list(), part["trainable_params"].to_list(), part["peak_memory_mb"].to_list())
        parts.append(part.with_columns(pl.Series("TPME", scores).round(4)))
    df = pl.concat(parts)
    # FFT's time and memory over each method's at the same batch size ("x less than FFT")
    fft = df.filter(pl.col("token") == "fft").select("dataset", "batch_size", pl.col("time_per_epoch_s").alias("_t"),
                                                      pl.col("peak_memory_mb").alias("_m"))
    df = df.join(fft, on=["dataset", "batch_size"], how="left", maintain_order="left").with_columns(
        (pl.col("_t") / pl.col("time_per_epoch_s")).round(2).alias("FFT time / time"),
        (pl.col("_m") / pl.col("peak_memory_mb")).round(2).alias("FFT memory / memory"),
    )
    df = df.with_columns(pl.col("time_per_epoch_s").round(3), pl.col("peak_memory_mb").round(1))
    df = df.select("dataset", "method", "token", "batch_size", "time_per_epoch_s", "peak_memory_mb", "trainable_params", "TPME",
                   "FFT time / time", "FFT memory / memory",
                   "device", "peak_memory_kind", "total_params", "cache_bytes", "time_source")
    write_csv(df, out)
    return df
