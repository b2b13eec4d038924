"""The table registry: every table and figure of the paper that aggregates runs, defined once.

An entry says what a table is called (its file, results/<name>.csv or .png), which config section
holds its settings and the JSON schema of that section (with its defaults), which rows it plans
(a function of the config), on which datasets, and how its CSV is built from the rows' runs. The
workflow's config check, its input functions and `iisan plan` read it from here; the paper's
published numbers are keyed by the same names and row keys (`iisan.tables.paper`), and the
paper's claims on it are listed with it (`iisan.tables.claims`). Adding a table is one
`register(Table(...))` call.

A planned row is a dict: label, key (the row's name in the paper's numbers), towers
([{field, backbone}]), method, scheme, cache, and for some tables token, group, column,
params_b, batch_size or seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from iisan.registry import Registry


@dataclass(frozen=True)
class Table:
    name: str  # results/<name>.csv (a figure: results/<name>.png); the entry of `tables` / `figures`
    title: str  # what it shows, for messages and the report
    # rows(config) -> the planned rows of one dataset (None: it plans no runs of its own)
    rows: Callable[[dict], list[dict]] | None = None
    # build(rows, metrics, out, extra) -> DataFrame: the CSV from the runs' metrics files (rows[i]
    # describes metrics[i], with dataset and seed); `extra` are the files of `extra_inputs`
    build: Callable | None = None
    header: str = "row"  # the CSV's row-label column
    section: str | None = None  # the config key of its settings
    schema: dict | None = None  # JSON schema of that section, defaults included
    figure: bool = False  # listed under `figures` (drawn by its own rule) instead of `tables`
    runs: str = "train"  # what its rows run: train (metrics.json), profile (Fig. 5's timed steps) or cache (Fig. 6)
    runs_of: str | None = None  # a figure drawn from another entry's runs
    # datasets(config) -> the datasets it runs on (default: `<section>.datasets`, else `datasets`)
    datasets: Callable[[dict], list[str]] | None = None
    check: Callable[[dict], None] | None = None  # what the schema cannot check; errors name the key
    extra_inputs: Callable[[dict], list[str]] | None = None  # files its build reads besides metrics
    file_name: Callable[[dict], str] | None = None  # its file name when configurable (the methods table)
    paper: bool = False  # the paper prints it: its numbers are in iisan/paper_values.yaml
    # the paper's claims read from its rows (`iisan.tables.claims.Claim`), decided on ours and on
    # the paper's numbers; and claims decided on its CSV as a whole:
    # file_claims(csv path or None, on the paper's data, table=name) -> claims.csv rows
    claims: tuple = ()
    file_claims: Callable | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def _check(table: Table) -> None:
    if table.runs_of is not None and table.runs_of not in TABLES:
        raise ValueError(f"table {table.name!r}: runs_of {table.runs_of!r} is not registered")


TABLES: Registry[Table] = Registry("table", check=_check)
register, unregister = TABLES.register, TABLES.unregister


def get(name: str, where: str = "table") -> Table:
    return TABLES.lookup(name, where)


def names(figures: bool | None = None) -> list[str]:
    """Registered names: all, the tables (figures=False) or the figures (figures=True)."""
    return [n for n, t in TABLES.items() if figures is None or t.figure == figures]
