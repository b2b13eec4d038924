"""The paper's claims, decided on this run's tables: results/claims.csv.

Every claim belongs to the registry entry of the table or figure it is read from
(`Table.claims`, `Table.file_claims` in `iisan.tables.entries`); this module holds the ways of
deciding them and the builder, which knows no table by name.

* A **row claim** (`Claim`) compares rows of one table: one row above another, the best row,
  rising group means, a relative gain, a significance test. It is decided on HR@10 and NDCG@10
  together, as the paper prints both: it holds only where it holds on each, and its numbers show
  both. On the paper's datasets the same comparison on the paper's own numbers is printed beside
  ours ("paper verdict", "paper"); a claim the paper states without numbers to decide it on (its
  significance marks, costs it only plots) carries the paper's statement instead.
* A **file claim** is decided on a figure's or table's CSV as a whole (Fig. 5's efficiency
  ratios, Fig. 6's cache sizes, Fig. 7's caches, the gates, the methods table's comparisons).

A claim *holds* or *does not hold* on our numbers, with the numbers it was decided on; it is
*not run* when its table is not among the run's outputs (or lacks the rows). A check that is
this project's and not the paper's says so in the "paper" column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from iisan.tables.build import CITED, GROUP_ORDER, METRICS, write_csv
from iisan.tables.paper import cells, values

HOLDS, FAILS, NOT_RUN = "holds", "does not hold", "not run"
COLUMNS = ("table", "dataset", "claim", "verdict", "ours", "paper verdict", "paper")
ALPHA = 0.05  # the paper's significance level (Tables III and V)
OURS = "ours, not the paper's"
CITED_BEST = "cited best"  # stands for the key of the best cited row  # the "paper" column of a check of this project's


class Source:
    """One side's numbers: {(table, dataset, key, column): {metric or CSV column: value}}."""

    def __init__(self, cells: dict, cited: dict | None = None):
        self.cells = cells
        # rows a table cites from elsewhere (keys "cited:<name>"), measured on another dataset:
        # {(table, key): row}, found by `get` from any dataset of the table
        self.cited = cited or {}

    @classmethod
    def ours(cls, csvs: dict[str, Path]) -> Source:
        out, cited = {}, {}
        for table, path in csvs.items():
            for r in pl.read_csv(path).iter_rows(named=True):
                if r.get("key") is None:
                    continue
                if r["key"].startswith(CITED):
                    cited[(table, r["key"])] = r
                else:
                    out[(table, r["dataset"], r["key"], r.get("column"))] = r
        return cls(out, cited)

    @classmethod
    def paper(cls) -> Source:
        """The paper's printed rows of every table it prints, with the means of Fig. 4's groups
        (Table IV's: the paper prints the rows only) computed as our Table IV computes ours."""
        from iisan.tables.registry import TABLES

        out = {}
        for table in (n for n, t in TABLES.items() if t.paper):
            for c in cells(table):
                out[(table, c["dataset"], c["row"], c.get("column"))] = c
            for group in GROUP_ORDER:
                part = [c for c in cells(table) if c.get("group") == group]
                if part:
                    out[(table, part[0]["dataset"], f"mean:{group}", None)] = {m: sum(c[m] for c in part) / len(part) for m in METRICS}
        return cls(out)

    def get(self, table, dataset, key, metric="hr@10", column=None):
        row = self.cited.get((table, key)) if key.startswith(CITED) else self.cells.get((table, dataset, key, column))
        v = None if row is None else row.get(metric)
        try:
            return None if v is None or v == "" else float(v)
        except (TypeError, ValueError):
            return None

    def datasets(self, table) -> list[str]:
        return list(dict.fromkeys(k[1] for k in self.cells if k[0] == table))

    def keys(self, table, dataset, column=None, prefix="") -> list[str]:
        return [k[2] for k in self.cells if k[0] == table and k[1] == dataset and k[3] == column and k[2].startswith(prefix)]


Decision = tuple[str, str]  # (verdict, the numbers it was decided on)


@dataclass(frozen=True)
class Claim:
    """A row claim of one table: `decide(source, dataset)` on ours and on the paper's numbers.
    `paper`: the paper's own word where its numbers cannot decide the claim (its verdict is then
    "holds" as stated, and this text stands for its numbers); `cited`: decided against rows the
    paper cites from elsewhere (only on the paper's data, where those rows were measured);
    `ours_only`: a check of this project's, not the paper's."""

    text: str
    decide: Callable[[Source, str], Decision]
    paper: str | None = None
    cited: bool = False
    ours_only: bool = False


# --- ways of deciding ----------------------------------------------------------------------------
def _fmt(m, x, y, sep="vs"):
    return f"{m} {x:.2f} {sep} {y:.2f}"


def above(table, a, b, column=None) -> Callable[[Source, str], Decision]:
    """Row a above row b on both metrics."""
    def decide(src, ds):
        pairs = [(m, src.get(table, ds, a, m, column), src.get(table, ds, b, m, column)) for m in METRICS]
        if any(x is None or y is None for _, x, y in pairs):
            return NOT_RUN, ""
        return (HOLDS if all(x > y for _, x, y in pairs) else FAILS), "; ".join(_fmt(*p) for p in pairs)
    return decide


def _best(src: Source, table, dataset, key, candidates, column=None) -> Decision:
    """Row `key` has the highest value among `candidates` on every metric; not run unless both
    metrics have `key` and at least one other candidate."""
    parts = []
    for m in METRICS:
        vals = {k: src.get(table, dataset, k, m, column) for k in candidates}
        vals = {k: v for k, v in vals.items() if v is not None}
        if key not in vals or len(vals) < 2:
            return NOT_RUN, ""
        parts.append((m, vals, max(vals, key=vals.get)))
    ok = all(vals[key] >= vals[best] for _, vals, best in parts)
    return (HOLDS if ok else FAILS), "; ".join(f"{m}: {key} {vals[key]:.2f}, best {best} {vals[best]:.2f}" for m, vals, best in parts)


def best(table, key, candidates: Callable[[Source, str], list[str]]) -> Callable[[Source, str], Decision]:
    return lambda src, ds: _best(src, table, ds, key, candidates(src, ds))


def best_of_prefix(table, key, prefix="") -> Callable[[Source, str], Decision]:
    return best(table, key, lambda src, ds: src.keys(table, ds, prefix=prefix))


def _rising(src: Source, ds, table, groups=tuple(GROUP_ORDER)) -> Decision:
    """Group means ("mean:<group>" rows) rise in `groups`' order on every metric, over the groups
    present; not run unless both metrics have at least two groups."""
    parts = []
    for m in METRICS:
        means = [(g, src.get(table, ds, f"mean:{g}", m)) for g in groups]
        means = [(g, v) for g, v in means if v is not None]
        if len(means) < 2:
            return NOT_RUN, ""
        parts.append((m, means))
    ok = all(a < b for _, means in parts for (_, a), (_, b) in zip(means, means[1:]))
    return (HOLDS if ok else FAILS), "; ".join(f"{m}: " + ", ".join(f"{g} {v:.2f}" for g, v in means) for m, means in parts)


def rising(table) -> Callable[[Source, str], Decision]:
    return lambda src, ds: _rising(src, ds, table)


def gain(table, a, b, low=None, high=None, column=None) -> Callable[[Source, str], Decision]:
    """Row a's relative gain over row b, (a - b) / b in percent, on both metrics: above `low`
    and/or at most `high`."""
    def decide(src, ds):
        parts = []
        for m in METRICS:
            x, y = src.get(table, ds, a, m, column), src.get(table, ds, b, m, column)
            if x is None or y is None or y == 0:
                return NOT_RUN, ""
            parts.append((m, 100 * (x - y) / y, x, y))
        ok = all((low is None or g > low) and (high is None or g <= high) for _, g, _, _ in parts)
        return (HOLDS if ok else FAILS), "; ".join(f"{m} {g:+.2f} % ({x:.2f} vs {y:.2f})" for m, g, x, y in parts)
    return decide


def each_above(table, pairs: Callable[[Source, str], list[tuple[str, str]]], column=None) -> Callable[[Source, str], Decision]:
    """Every (a, b) pair: a above b on both metrics; not run without a pair both sides have."""
    def decide(src, ds):
        got = [(a, b, above(table, a, b, column)(src, ds)) for a, b in pairs(src, ds)]
        got = [(a, b, d) for a, b, d in got if d[0] != NOT_RUN]
        if not got:
            return NOT_RUN, ""
        ok = all(d[0] == HOLDS for _, _, d in got)
        return (HOLDS if ok else FAILS), " | ".join(f"{a} vs {b}: {d[1]}" for a, b, d in got)
    return decide


def drop_larger(table, full, ablated, than_column, in_column) -> Callable[[Source, str], Decision]:
    """Removing `ablated` costs column `in_column` more points than column `than_column`, on
    both metrics (Table VI: removing LayerDrop hurts IISAN-VA more than IISAN-VS)."""
    def decide(src, ds):
        parts = []
        for m in METRICS:
            d = {}
            for col in (than_column, in_column):
                x, y = src.get(table, ds, full, m, col), src.get(table, ds, ablated, m, col)
                if x is None or y is None:
                    return NOT_RUN, ""
                d[col] = x - y
            parts.append((m, d))
        ok = all(d[in_column] > d[than_column] for _, d in parts)
        return (HOLDS if ok else FAILS), "; ".join(f"{m}: {in_column} -{d[in_column]:.2f}, {than_column} -{d[than_column]:.2f}"
                                                  for m, d in parts)
    return decide


def significant(table, key, p_column: str, versus: str) -> Callable[[Source, str], Decision]:
    """Row `key` better than `versus` (a row key, or CITED_BEST) at p < ALPHA on both metrics,
    from the table's p-value columns (`p_column` with {m} for the metric); not run where the test
    has too few seeds."""
    def decide(src, ds):
        other = cited_best(src, table) if versus == CITED_BEST else versus
        if other is None:
            return NOT_RUN, "no cited rows in the table"
        parts = []
        for m in METRICS:
            p = src.get(table, ds, key, p_column.format(m=m))
            x, y = src.get(table, ds, key, m), src.get(table, ds, other, m)
            if p is None or math.isnan(p) or x is None or y is None:
                return NOT_RUN, ("the test needs at least two seeds per row (the table's significance_seeds)"
                                 if x is not None and y is not None else "")
            parts.append((m, p, x, y))
        ok = all(p < ALPHA and x > y for _, p, x, y in parts)
        return (HOLDS if ok else FAILS), "; ".join(f"{m} {x:.2f} vs {y:.2f}, p {p:.3f}" for m, p, x, y in parts)
    return decide


def cited_best(src: Source, table) -> str | None:
    """The key of the best cited row (highest HR@10) of a table that prints cited rows."""
    keys = [k for t, k in src.cited if t == table and src.get(table, "", k) is not None]
    return max(keys, key=lambda k: src.get(table, "", k)) if keys else None


def above_cited_best(table, key) -> Callable[[Source, str], Decision]:
    def decide(src, ds):
        best_key = cited_best(src, table)
        if best_key is None:
            return NOT_RUN, "no cited rows in the table"
        verdict, numbers = above(table, key, best_key)(src, ds)
        return verdict, f"{best_key.removeprefix(CITED)}: {numbers}" if numbers else numbers
    return decide


def stated(why: str) -> Callable[[Source, str], Decision]:
    """A claim this workflow has no numbers for: never decided (`why` says what is missing)."""
    return lambda src, ds: (NOT_RUN, why)


def group_keys(src: Source, table, ds, groups) -> list[str]:
    """The keys of the rows (not the means) whose `group` is one of `groups`, in table order."""
    return [k for k in src.keys(table, ds) if not k.startswith("mean:")
            and (src.cells[(table, ds, k, None)].get("group") in groups)]


def best_in_group(table, group, among=tuple(GROUP_ORDER)) -> Callable[[Source, str], Decision]:
    """The best row on each metric, among the rows of the groups `among`, is one of `group`."""
    def decide(src, ds):
        keys = group_keys(src, table, ds, among)
        mine = group_keys(src, table, ds, (group,))
        if not mine or len(keys) < 2:
            return NOT_RUN, ""
        parts = []
        for m in METRICS:
            vals = {k: src.get(table, ds, k, m) for k in keys}
            vals = {k: v for k, v in vals.items() if v is not None}
            if not vals:
                return NOT_RUN, ""
            parts.append((m, max(vals, key=vals.get), vals))
        ok = all(b in mine for _, b, _ in parts)
        return (HOLDS if ok else FAILS), "; ".join(f"{m}: best {b} {vals[b]:.2f}" for m, b, vals in parts)
    return decide


INSTRUCT = re.compile(r"-(it|chat)(?=-|$)")  # the name part of an instruction-tuned model


def instruct_pairs(src: Source, table, ds) -> list[tuple[str, str]]:
    """(instruction-tuned row, its base row): a row whose name has an "-it" or "-chat" part beside
    the row named without it (llama3-8b-it / llama3-8b, llama2-7b-chat-demo / llama2-7b-demo)."""
    keys = src.keys(table, ds)
    return [(k, INSTRUCT.sub("", k, count=1)) for k in keys if INSTRUCT.search(k) and INSTRUCT.sub("", k, count=1) in keys]


def instruct_helps_only(table, group) -> Callable[[Source, str], Decision]:
    """Instruction tuning lifts a model above its base model (on both metrics) in `group` and in
    no other group."""
    def decide(src, ds):
        pairs = instruct_pairs(src, table, ds)
        inside = [p for p in pairs if src.cells[(table, ds, p[1], None)].get("group") == group]
        if not inside or len(pairs) < 2:
            return NOT_RUN, ""
        got = [(it, base, above(table, it, base)(src, ds)) for it, base in pairs]
        ok = all((d[0] == HOLDS) == ((it, base) in inside) for it, base, d in got)
        return (HOLDS if ok else FAILS), " | ".join(f"{it} {'above' if d[0] == HOLDS else 'not above'} {base}"
                                                   for it, base, d in got)
    return decide


def scaled_images(src: Source, table, ds, text_group) -> list[tuple[str, list[str]]]:
    """(text encoder row, its rows with larger image encoders in table order) for the text
    encoders of `text_group` that have image-scaling rows ("<text> + <image>")."""
    out = []
    for text in group_keys(src, table, ds, (text_group,)):
        larger = [k for k in src.keys(table, ds) if k.startswith(f"{text} + ")]
        if larger:
            out.append((text, larger))
    return out


def larger_image_gain(table, text_group, high) -> Callable[[Source, str], Decision]:
    """The first larger image encoder lifts the text encoder of `text_group` by more than 0 and at
    most `high` percent (relative, both metrics)."""
    def decide(src, ds):
        got = scaled_images(src, table, ds, text_group)
        if not got:
            return NOT_RUN, ""
        text, larger = got[0]
        verdict, numbers = gain(table, larger[0], text, low=0, high=high)(src, ds)
        return verdict, f"{larger[0]} over {text}: {numbers}" if numbers else numbers
    return decide


def largest_image_adds_nothing(table, text_group) -> Callable[[Source, str], Decision]:
    """The largest image encoder is not above the next larger one (both metrics)."""
    def decide(src, ds):
        got = [(t, ls) for t, ls in scaled_images(src, table, ds, text_group) if len(ls) >= 2]
        if not got:
            return NOT_RUN, ""
        _, larger = got[0]
        verdict, numbers = above(table, larger[-1], larger[-2])(src, ds)
        if verdict == NOT_RUN:
            return verdict, numbers
        return (FAILS if verdict == HOLDS else HOLDS), f"{larger[-1]} vs {larger[-2]}: {numbers}"
    return decide


def larger_image_lowers(table, text_group) -> Callable[[Source, str], Decision]:
    """Every larger image encoder puts the text encoder of `text_group` below its base row."""
    def decide(src, ds):
        got = scaled_images(src, table, ds, text_group)
        if not got:
            return NOT_RUN, ""
        text, larger = got[0]
        return each_above(table, lambda s, d: [(text, k) for k in larger])(src, ds)
    return decide


def group_gain(table, group, low) -> Callable[[Source, str], Decision]:
    """The second row of `group` gains more than `low` percent over its first (both metrics)."""
    def decide(src, ds):
        keys = group_keys(src, table, ds, (group,))
        if len(keys) < 2:
            return NOT_RUN, ""
        verdict, numbers = gain(table, keys[1], keys[0], low=low)(src, ds)
        return verdict, f"{keys[1]} over {keys[0]}: {numbers}" if numbers else numbers
    return decide


# --- file claims ---------------------------------------------------------------------------------
def _row(table, claim, verdict, ours, dataset="", paper_verdict="", paper_text="") -> dict:
    return {"table": table, "dataset": dataset, "claim": claim, "verdict": verdict, "ours": ours,
            "paper verdict": paper_verdict, "paper": paper_text}


def efficiency_claims(path: Path | None, on_paper: bool = False, *, table: str) -> list[dict]:
    """The introduction's "up to" ratios against our efficiency.csv: the largest ratio over the
    measured batch sizes of FFT's (or the better embedded PEFT's) time and peak memory to IISAN's
    (cached)."""
    out = []
    df = pl.read_csv(path) if path else None
    for c in values().get("efficiency_claims") or []:
        against = "full fine-tuning" if "full fine-tuning" in c["claim"] else "embedded PEFT"
        verdict, numbers = NOT_RUN, ""
        if df is not None and df.filter(pl.col("token") == "iisan").height:
            col = "time_per_epoch_s" if c["quantity"] == "time" else "peak_memory_mb"
            ratios = []
            for (_ds, b), part in df.group_by("dataset", "batch_size", maintain_order=True):
                ours = part.filter(pl.col("token") == "iisan")[col]
                base = part.filter(pl.col("token").is_in(["fft"] if against == "full fine-tuning" else ["adapter", "lora"]))[col]
                if ours.len() and base.len() and ours[0] > 0:
                    ratios.append((float(base.min()) / float(ours[0]), b))
            if ratios:
                r, b = max(ratios)
                verdict = HOLDS if r >= c["value"] else FAILS
                numbers = f"largest ratio {r:.1f}x at batch {b} (batches {', '.join(str(x) for _, x in sorted(ratios, key=lambda t: t[1]))})"
        out.append(_row(table, f"{c['claim']}: {c['value']}x", verdict, numbers, paper_text=f"up to {c['value']}x (introduction)"))
    return out


def gate_claims(path: Path | None, on_paper: bool, *, table: str) -> list[dict]:
    """RQ5: the image's share in the inter-modal gates lies between 0.2 and 0.4 in every run."""
    claim = "visual (inter-modal) gate weights between 0.2 and 0.4"
    theirs = {"paper_verdict": HOLDS, "paper_text": "0.2-0.4 in all structures (text, RQ5)"} if on_paper else {}
    if path is None:
        return [_row(table, claim, NOT_RUN, "", **theirs)]
    df = pl.read_csv(path).filter(pl.col("part") == "inter")
    out = []
    for ds in df["dataset"].unique(maintain_order=True):
        part = df.filter(pl.col("dataset") == ds)
        vals = list(zip(part["key"], part["gate mean"]))
        ok = all(0.2 <= v <= 0.4 for _, v in vals)
        out.append(_row(table, claim, HOLDS if ok else FAILS, ", ".join(f"{k} {v:.3f}" for k, v in vals), ds, **theirs))
    return out or [_row(table, claim, NOT_RUN, "", **theirs)]


# Fig. 7 itself compares GPU memory and training time of full and dropped caches; that they give
# the same metrics is this project's check (the dropped layers are never read)
OURS_FIG7 = f"{OURS}: its Fig. 7 compares GPU memory and training time; equal metrics follow from the dropped layers never being read"
FIG7_TIME = "the dropped cache trains an epoch faster than the full cache"
FIG7_PAPER = "stated for Llama3-70B-GPTQ (RQ4, Fig. 7 plots it; no numbers printed)"


def cache_claims(path: Path | None, on_paper: bool = False, *, table: str) -> list[dict]:
    """Fig. 7: per text encoder, the dropped cache trains faster than the full one (RQ4), and
    both give one model the same metrics (a check of ours)."""
    claim = "full and dropped caches give the same HR@10 and NDCG@10"
    if path is None:
        return [_row(table, FIG7_TIME, NOT_RUN, "", paper_text=FIG7_PAPER), _row(table, claim, NOT_RUN, "", paper_text=OURS_FIG7)]
    df = pl.read_csv(path)
    out = []
    for (ds, name), part in df.group_by("dataset", "text encoder", maintain_order=True):
        got = {r["cache"]: r for r in part.iter_rows(named=True)}
        if not {"full", "dropped"} <= set(got):
            continue
        f, d = got["full"], got["dropped"]
        faster = d["seconds_per_epoch"] < f["seconds_per_epoch"]
        out.append(_row(table, f"{name}: {FIG7_TIME}", HOLDS if faster else FAILS,
                        f"dropped {d['seconds_per_epoch']:.3f} s vs full {f['seconds_per_epoch']:.3f} s per epoch", ds,
                        HOLDS if on_paper else "", FIG7_PAPER))
        same = all(abs(f[m] - d[m]) < 1e-6 for m in METRICS)
        out.append(_row(table, f"{name}: {claim}", HOLDS if same else FAILS,
                        f"full {f['hr@10']:.2f}/{f['ndcg@10']:.2f}, dropped {d['hr@10']:.2f}/{d['ndcg@10']:.2f}", ds, paper_text=OURS_FIG7))
    return out


FIG6_CLAIM = "the largest cache (the 70B's) shrinks to under a tenth when LayerDrop keeps six layers"
FIG6_PAPER = "26 GB -> 2.4 GB for Llama3-70B-GPTQ on Scientific (RQ4): 10.8x"


def cache_size_claims(path: Path | None, on_paper: bool = False, *, table: str) -> list[dict]:
    """RQ4 / Fig. 6: the largest full cache and its dropped size (measured where the cache
    exists, else computed)."""
    theirs = {"paper_verdict": HOLDS if on_paper else "", "paper_text": FIG6_PAPER}
    if path is None:
        return [_row(table, FIG6_CLAIM, NOT_RUN, "", **theirs)]
    df = pl.read_csv(path)
    if not df.height:
        return [_row(table, FIG6_CLAIM, NOT_RUN, "", **theirs)]
    r = df.sort("computed_full_bytes", descending=True).row(0, named=True)
    full = r["measured_full_bytes"] or r["computed_full_bytes"]
    dropped = r["measured_dropped_bytes"] or r["computed_dropped_bytes"]
    how = "measured" if r["measured_full_bytes"] and r["measured_dropped_bytes"] else "computed"
    ratio = full / dropped
    return [_row(table, FIG6_CLAIM, HOLDS if ratio >= 10 else FAILS,
                 f"{r['backbone']}: {full / 1e9:.3g} GB -> {dropped / 1e9:.3g} GB ({how}), {ratio:.1f}x", **theirs)]


def versus_claims(path: Path | None, on_paper: bool = False, *, table: str) -> list[dict]:
    """The methods table's own comparisons: each row with `versus` above that row on both
    metrics (its mean difference over seeds, with the paired t-test)."""
    if path is None:
        return []
    out = []
    for r in pl.read_csv(path).iter_rows(named=True):
        if not r.get("versus"):
            continue
        deltas = [(m, r.get(f"Δ {m} vs versus"), r.get(f"p {m}")) for m in METRICS]
        if any(d is None for _, d, _ in deltas):
            verdict, numbers = NOT_RUN, ""
        else:
            verdict = HOLDS if all(d > 0 for _, d, _ in deltas) else FAILS
            numbers = "; ".join(f"Δ {m} {d:+.2f}" + (f" (paired p {p:.3f})" if p is not None else "") for m, d, p in deltas)
        out.append(_row(table, f"{r['method']} above {r['versus']}", verdict, numbers, r["dataset"], paper_text=OURS))
    return out


# --- the builder ---------------------------------------------------------------------------------
PAPER_SOURCE: list[Source] = []  # the paper's numbers, read once


def claim_list(registry: dict | None = None) -> list[tuple[str, Claim]]:
    """(table, claim) for every row claim of the registry, in registry order."""
    from iisan.tables.registry import TABLES

    return [(name, c) for name, t in (registry or TABLES).items() for c in t.claims]


def build_claims(inputs: dict[str, Path | str], out: Path | str, paper: dict[str, bool] | None = None) -> pl.DataFrame:
    """results/claims.csv from the run's tables and figures (`inputs`: registry name -> its CSV);
    `paper[name]` says whether that table ran on the paper's data, where the paper's verdict on the
    same comparison is printed beside ours. Every registered claim is a row: a table that did not
    run gives "not run"."""
    from iisan.tables.registry import TABLES

    paper = paper or {}
    csvs = {k: Path(v) for k, v in inputs.items()}
    ours = Source.ours({k: v for k, v in csvs.items() if k in TABLES and TABLES[k].claims})
    if not PAPER_SOURCE:
        PAPER_SOURCE.append(Source.paper())
    # the rows the paper cites from elsewhere are printed by the paper too: our tables carry them
    theirs = Source(PAPER_SOURCE[0].cells, ours.cited)
    rows = []
    for name, t in TABLES.items():
        for ds in ours.datasets(name) or [""]:
            for c in t.claims:
                text = c.text
                if name not in csvs:
                    verdict, numbers = NOT_RUN, ""
                elif c.cited and not paper.get(name):
                    verdict, numbers = NOT_RUN, "the cited rows were measured on the paper's dataset; this run's is not"
                else:
                    verdict, numbers = c.decide(ours, ds)
                if c.ours_only:
                    p_verdict, p_numbers = "", OURS
                elif not paper.get(name):
                    p_verdict, p_numbers = "", ""
                elif c.paper is not None:
                    p_verdict, p_numbers = HOLDS, c.paper
                else:
                    p_verdict, p_numbers = c.decide(theirs, ds)
                rows.append(_row(name, text, verdict, numbers, ds, p_verdict, p_numbers))
        if t.file_claims is not None:
            rows += t.file_claims(csvs.get(name), paper.get(name, False), table=name)
    df = pl.DataFrame(rows, schema={k: pl.String for k in COLUMNS})
    write_csv(df, Path(out))
    return df
