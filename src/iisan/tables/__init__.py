"""The paper's tables and figures: the table registry (`registry`, its entries in `entries`),
their builders (`build`), the paper's published numbers beside ours (`paper`) and the paper's
claims decided on our tables (`claims`). The functions below plan every table from its entry;
the workflow's input functions and `iisan plan` call them."""

from __future__ import annotations

from pathlib import Path

from .. import plan
from ..layerdrop import tower_schemes
from . import entries, paper  # noqa: F401  (entries registers the paper's tables)
from .build import (  # noqa: F401  (the builders' names, for the workflow's scripts)
    GROUP_ORDER,
    aggregate,
    build_efficiency,
    build_table3,
    paired_ttest,
    read_cited,
    tpme,
    write_csv,
)
from .registry import TABLES, Table, get, names, register, unregister  # noqa: F401


def runs_entry(name: str) -> Table:
    """The entry whose rows a table or figure draws (itself, or the one of `runs_of`)."""
    t = get(name)
    return get(t.runs_of) if t.runs_of else t


def table_plan(name: str, config: dict) -> list[dict]:
    """Rows of table (or figure) `name`, for one dataset."""
    t = runs_entry(name)
    return t.rows(config) if t.rows else []


def table_datasets(config: dict, name: str) -> list[str]:
    t = runs_entry(name)
    return t.datasets(config) if t.datasets else list(config["datasets"])


def plan_runs(name: str, config: dict) -> list[tuple[dict, str]]:
    """[(row description, metrics path)] for every dataset, row and seed of a table or figure.
    Each description holds `config_hash`, the hash of the experiment the config gives its run
    (what the train rule's params `experiment` hold, and its metrics.json records): the
    builders check that the file is that run's (`iisan.tables.build.foreign_run`)."""
    out = []
    for dataset in table_datasets(config, name):
        for row in table_plan(name, config):
            wildcards = plan.run_wildcards(dataset, row)
            for seed in row.get("seeds") or config["seeds"]:
                desc = {k: v for k, v in row.items() if k not in ("towers", "seeds")}
                identity = plan.experiment(config, **wildcards, seed=seed).hash()
                out.append((dict(desc, dataset=dataset, seed=seed, config_hash=identity), plan.run_path(dataset, row, seed)))
    return out


def efficiency_plan(config: dict) -> list[tuple[dict, str]]:
    """[(row, profile path)]: every Fig. 5 method x batch size on its dataset; each row holds
    the `config_hash` of the experiment its profile times (`iisan.plan.profile_experiment`)."""
    return [(dict(row, dataset=dataset, config_hash=plan.profile_experiment(config, **plan.run_wildcards(dataset, row)).hash()),
             plan.profile_path(dataset, row))
            for dataset in table_datasets(config, "fig5") for row in table_plan("fig5", config)]


def fig6_caches(config: dict) -> list[str]:
    """Every cache folder (full and dropped) of the Table IV runs, for measured sizes."""
    out = set()
    for dataset in table_datasets(config, "fig6"):
        for row in table_plan("table4", config):
            for t, s in zip(row["towers"], tower_schemes(row["scheme"], len(row["towers"]))):
                out.update(plan.cache_dir(dataset, t["field"], t["backbone"], scheme) for scheme in (None, s))
    return sorted(out)


# --- file names ----------------------------------------------------------------------------------
def table_name(config: dict, name: str) -> str:
    """The file name (results/<name>.csv) of a table: the methods table's is configurable."""
    t = get(name)
    return t.file_name(config) if t.file_name else t.name


def table_file(config: dict, name: str) -> str:
    return plan.TABLE.format(table=table_name(config, name))


def table_kind(config: dict, file_name: str) -> str:
    """The registry name of results/<file_name>.csv."""
    return next((n for n in names(figures=False) if table_name(config, n) == file_name), file_name)


def targets(config: dict) -> list[str]:
    out = [table_file(config, k) for k in config["tables"]] + [plan.FIGURE.format(figure=f) for f in config["figures"]]
    return out + ([plan.CLAIMS] if config["claims"] else [])


def runs_on_paper_data(config: dict, name: str) -> bool:
    """Whether table or figure `name` runs on the paper's datasets with their real data (where
    the paper's verdict on each of its claims is printed beside ours)."""
    return paper.on_paper_data(config, table_datasets(config, name))


def compares_to_paper(config: dict, name: str) -> bool:
    """Whether table `name` prints the paper's numbers beside ours: the paper prints it and it runs
    on the paper's datasets with their real data."""
    return get(name).paper and runs_on_paper_data(config, name)


# --- building ------------------------------------------------------------------------------------
def build_table(name: str, rows: list[dict], metrics: list, out: Path | str, extra=(), with_paper: bool = False):
    """The CSV of table `name` from its runs (rows[i] describes metrics[i]); with `with_paper`,
    the paper's numbers and our differences beside each metric."""
    t = get(name)
    df = t.build(rows, [Path(m) for m in metrics], t.header, list(extra))
    if with_paper:
        df = paper.attach(name, df)
    write_csv(df, Path(out))
    return df
