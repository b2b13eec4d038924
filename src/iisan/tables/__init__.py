"""The paper's tables and figures: the table registry (`registry`, its entries in `entries`),
their builders (`build`), the paper's published numbers beside ours (`paper`) and the paper's
claims decided on our tables (`claims`). The functions below plan every table from its entry;
the workflow's input functions and `iisan plan` call them."""

from __future__ import annotations

import json
from pathlib import Path

from iisan.pipeline import plan
from iisan.tables import entries, paper  # noqa: F401  (entries registers the paper's tables)
from iisan.tables.build import (  # noqa: F401  (the builders' names, for the workflow's scripts)
    GROUP_ORDER,
    aggregate,
    build_efficiency,
    build_table3,
    paired_ttest,
    read_cited,
    tpme,
    write_csv,
)
from iisan.tables.registry import TABLES, Table, get, names, register, unregister  # noqa: F401
from iisan.training.layerdrop import tower_schemes


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


def planned_run_tables(config: dict) -> list[str]:
    """The entries whose rows the config trains: its tables, the entries its figures draw runs
    from (Fig. 4: Table IV's; Fig. 7 its own; not Fig. 5's profiles nor Fig. 6's caches) and the
    methods table where the config has rows for it; each once, in that order."""
    out = list(config.get("tables") or [])
    out += [runs_entry(f).name for f in config.get("figures") or [] if runs_entry(f).runs == "train" and runs_entry(f).rows]
    if config.get("methods") and "methods" in TABLES:
        out.append("methods")
    return [n for n in dict.fromkeys(out) if n in TABLES and runs_entry(n).runs == "train"]


def run_identity(config: dict, dataset: str, row: dict) -> tuple:
    """What a row's run computes, up to its seed: dataset and canonical wildcards (towers,
    method, canonical scheme, cache), `iisan.pipeline.plan.run_wildcards` with the config."""
    return tuple(plan.run_wildcards(dataset, row, config).values())


_SEEDS: dict[tuple, dict[tuple, list[int]]] = {}  # config fingerprint -> run_seeds


def _fingerprint(config: dict) -> tuple:
    """The config's content and the registry's entries: a key that a change of either misses."""
    return json.dumps(config, sort_keys=True, default=str), tuple((n, id(t)) for n, t in TABLES.items())


def run_seeds(config: dict) -> dict[tuple, list[int]]:
    """{run identity: seeds}: every planned row (`planned_run_tables`, on each of its datasets)
    asks its run for its `seeds`, else config `seeds`; a run identity trains the union of what its
    rows ask, in order (tables first, as the config lists them), so that every table printing one
    configuration reads the same runs with the same seeds (Table VII's 6 blocks and Table VI's
    full model read Table III's significance seeds). Computed once per config (and registry)."""
    key = _fingerprint(config)
    if key not in _SEEDS:
        out: dict[tuple, list[int]] = {}
        for name in planned_run_tables(config):
            for dataset in table_datasets(config, name):
                for row in table_plan(name, config):
                    seeds = out.setdefault(run_identity(config, dataset, row), [])
                    seeds += [s for s in dict.fromkeys(row.get("seeds") or config["seeds"]) if s not in seeds]
        if len(_SEEDS) > 16:
            _SEEDS.clear()
        _SEEDS[key] = out
    return _SEEDS[key]


def plan_runs(name: str, config: dict) -> list[tuple[dict, str]]:
    """[(row description, metrics path)] for every dataset, row and seed of a table or figure.
    A row's run is named by what it computes (`iisan.pipeline.plan.run_wildcards` with the config: the
    canonical scheme) and trains the seeds of `run_seeds` (the union of what the planned rows of
    every table ask of it; a table the config does not plan adds its own). Each description holds
    `config_hash`, the hash of the experiment the config gives its run (what the train rule's
    params `experiment` hold, and its metrics.json records): the builders check that the file is
    that run's (`iisan.tables.build.foreign_run`)."""
    shared = run_seeds(config)
    out = []
    for dataset in table_datasets(config, name):
        for row in table_plan(name, config):
            wildcards = plan.run_wildcards(dataset, row, config)
            seeds = list(shared.get(tuple(wildcards.values()), []))
            seeds += [s for s in dict.fromkeys(row.get("seeds") or config["seeds"]) if s not in seeds]
            desc = {k: v for k, v in row.items() if k not in ("towers", "seeds")}
            for seed in seeds:
                identity = plan.experiment(config, **wildcards, seed=seed).hash()
                out.append((dict(desc, dataset=dataset, seed=seed, config_hash=identity), plan.RUN_METRICS.format(**wildcards, seed=seed)))
    return out


def efficiency_plan(config: dict) -> list[tuple[dict, str]]:
    """[(row, profile path)]: every Fig. 5 method x batch size on its dataset (its run's canonical
    folder, one seed: config `seeds`' first); each row holds the `config_hash` of the experiment
    its profile times (`iisan.pipeline.plan.profile_experiment`)."""
    return [(dict(row, dataset=dataset, config_hash=plan.profile_experiment(config, **plan.run_wildcards(dataset, row, config)).hash()),
             plan.profile_path(dataset, row, config))
            for dataset in table_datasets(config, "fig5") for row in table_plan("fig5", config)]


def fig6_caches(config: dict) -> list[str]:
    """Every cache folder (full and dropped) of the Table IV runs, for measured sizes."""
    out = set()
    for dataset in table_datasets(config, "fig6"):
        for row in table_plan("table4", config):
            scheme = plan.run_scheme(config, row["towers"], row["method"], row["scheme"])  # the runs' pruned caches
            for t, s in zip(row["towers"], tower_schemes(scheme, len(row["towers"]))):
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
