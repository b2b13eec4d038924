"""The config a workflow run sees: the schema (config/schemas/config.schema.yaml, with each table
section's schema from the table registry), its defaults, and the checks no schema can make.

The Snakefile calls `validate` and `check_config`; `workflow_config` does what a run does for
Python callers (`iisan plan`, tests). `warn_future_files` is the Snakefile's check, when a run
starts, for outputs dated ahead of the clock.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from iisan import tables
from iisan.config import TowerConfig, typed
from iisan.errors import NamedError
from iisan.pipeline import plan
from iisan.training import methods

SCHEMA = "config/schemas/config.schema.yaml"
DEFAULT_CONFIG = "config/config.yaml"  # relative to the workflow's folder (the Snakefile's)


def load_yaml(path: Path | str) -> dict:
    """A config file's mapping; a YAML syntax error raises ValueError naming the file, line and
    column (PyYAML alone names none when it is given the text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "; ".join(m for m in (err.context, err.problem) if m)
        raise ValueError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file is a mapping of keys, not a {type(data).__name__}")
    return data


def from_code() -> dict[tuple[str, ...], dict]:
    """Schema keywords the code defines (enums, minimums), by their place in the schema: the
    schema file leaves them out and `schema` fills them in, so that the values the schema allows
    are the ones the code takes."""
    from iisan.captions.settings import ATTENTIONS, KV_CACHES, CaptionSettings
    from iisan.config import ITEM_SLOTS, PRECISIONS
    from iisan.data import kinds
    from iisan.data.amazon import MIN_INTERACTIONS, MIN_WINDOW
    from iisan.encoders.backbones import CACHE_DTYPES, FAMILIES, QUANTIZATIONS

    backbone = ("properties", "backbones", "additionalProperties", "properties")
    train = ("definitions", "train", "properties")
    preprocess = ("properties", "preprocess", "properties")
    captions = ("properties", "captions", "properties")
    return {
        (*backbone, "family"): {"enum": sorted(FAMILIES)},
        (*backbone, "modality"): {"enum": sorted(set(FAMILIES.values()))},
        (*backbone, "quantization"): {"enum": sorted(QUANTIZATIONS, key=lambda q: (q is None, q or ""))},
        (*train, "precision"): {"enum": list(PRECISIONS)},
        (*train, "item_slots"): {"enum": list(ITEM_SLOTS)},
        ("properties", "cache", "properties", "dtype"): {"enum": list(CACHE_DTYPES)},
        ("properties", "tables", "items"): {"enum": tables.names(figures=False)},
        ("properties", "figures", "items"): {"enum": tables.names(figures=True)},
        (*preprocess, "min_interactions"): {"minimum": MIN_INTERACTIONS},
        (*preprocess, "window"): {"minimum": MIN_WINDOW},
    } | kinds.schema_keywords() | {(*captions, key): {"default": value, **({"enum": list(enum)} if enum else {})}
         for key, value in CaptionSettings.defaults().items() for enum in [{"kv_cache": KV_CACHES, "attention": ATTENTIONS}.get(key)]}


@functools.lru_cache(maxsize=4)
def _schema_file(path: str, mtime_ns: int, size: int) -> dict:
    """The schema file, parsed once per version of it."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def schema(root: Path | str = ".") -> dict:
    """The config schema: the file's, with every registered table section, the registry's names
    as the only `tables` and `figures`, and the enums and minimums the code defines (`from_code`)."""
    path = Path(root) / SCHEMA
    stat = path.stat()
    out = copy.deepcopy(_schema_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size))
    props = out["properties"]
    for t in tables.TABLES.values():
        if t.section and t.schema:
            if t.section in props:
                raise ValueError(f"{SCHEMA}: key {t.section!r} is also the section of table {t.name!r} (iisan.tables)")
            props[t.section] = copy.deepcopy(t.schema)
    for place, keywords in from_code().items():
        node = out
        for key in place:
            node = node[key]
        if set(keywords) & set(node):
            raise ValueError(f"{SCHEMA}: {'.'.join(place)} sets {', '.join(set(keywords) & set(node))}, which the code "
                             "defines (iisan.pipeline.workflow.from_code); leave it out of the file")
        node.update(copy.deepcopy(keywords))
    return out


def key_name(path) -> str:
    """A config key as messages write it: `table3.methods[0]`, `backbones.bert-demo.family`."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _message(err) -> str:
    """A schema violation as one line: the key, the bad value and what is allowed (never the
    schema itself)."""
    where = key_name(err.absolute_path)
    sch = err.schema if isinstance(err.schema, dict) else {}
    v = err.validator
    if v == "required":
        missing = next(k for k in err.validator_value if k not in err.instance)
        key = f"{where}.{missing}" if where else missing
        return f"config key {key}: missing (required{f' in {where}' if where else ' at the top level'})"
    if v == "additionalProperties" and sch.get("properties") is not None:
        unknown = sorted(set(err.instance) - set(sch["properties"]))
        allowed = ", ".join(sch["properties"])
        return f"config key {key_name([*err.absolute_path, unknown[0]]) if unknown else where}: " \
               f"{err.message} (allowed keys{f' of {where}' if where else ''}: {allowed})"
    head = f"config key {where or '(top level)'}: "
    if v == "enum":
        return head + f"{err.instance!r} is not one of {', '.join('null' if e is None else str(e) for e in err.validator_value)}"
    if v == "pattern":
        return head + f"{err.instance!r} is not allowed: {sch.get('description') or 'it must match ' + repr(err.validator_value)}"
    if v == "uniqueItems":
        seen, dup = set(), None
        for x in err.instance:
            k = repr(x)
            if k in seen:
                dup = x
                break
            seen.add(k)
        return head + f"{dup!r} is listed twice in {err.instance!r} (each value once)"
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minItems", "maxItems", "type", "const"):
        return head + err.message
    if v in ("oneOf", "anyOf") and isinstance(err.validator_value, list):
        return head + f"{err.instance!r} is not allowed: expected {' or '.join(_describe(b) for b in err.validator_value)}"
    text = err.message
    return head + (text if len(text) <= 300 else text[:300] + " ...")


def _describe(sub: dict) -> str:
    """One alternative of a oneOf/anyOf, in words: its type and enum or bounds."""
    if "enum" in sub:
        return f"one of {', '.join(map(str, sub['enum']))}"
    types = sub.get("type", "value")
    words = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer", "number": "a number",
             "boolean": "true or false", "null": "null"}
    text = " or ".join(words.get(t, t) for t in (types if isinstance(types, list) else [types]))
    if "minimum" in sub:
        text += f" >= {sub['minimum']}"
    if sub.get("type") == "object" and sub.get("properties"):
        text += f" of {', '.join(sub['properties'])}"
    return text


def validate(config: dict, root: Path | str = ".") -> dict:
    """Check `config` against the schema and fill in its defaults (in place); a violation raises
    ValueError naming the key, the bad value and what is allowed."""
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import best_match

    def set_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, sch)

    Validator = validators.extend(Draft202012Validator, {"properties": set_defaults})
    err = best_match(Validator(schema(root)).iter_errors(config))
    if err is not None:
        raise ValueError(_message(err))
    check_finite(config)
    return config


def check_finite(config, path: tuple = ()) -> None:
    """Refuse a NaN or infinite number anywhere in the config (YAML's `.nan`, `.inf`, or `nan`
    and `inf` on the command line, which Snakemake reads as floats): JSON Schema's bounds let
    NaN through (every comparison with it is false) and a training run would fail on it much
    later naming no key. The ValueError names the key."""
    if isinstance(config, float) and not math.isfinite(config):
        what = "NaN (not a number)" if math.isnan(config) else f"{'-' if config < 0 else ''}infinity"
        raise ValueError(f"config key {key_name(path) or '(top level)'}: {config!r} reads as {what}; give a finite number")
    if isinstance(config, dict):
        for k, v in config.items():
            check_finite(v, (*path, k))
    elif isinstance(config, list | tuple):
        for i, v in enumerate(config):
            check_finite(v, (*path, i))


def check_config(config: dict) -> None:
    """What the schema cannot check: tower fields against backbone modalities, method names
    against the method registry, datasets named by other keys, the default LayerDrop scheme and
    the user encoder's length against the backbones and the data, and each configured table's own
    checks and plan (iisan.tables): every run it plans is an experiment whose towers keep layers
    their backbones have. Errors name the config key."""
    for i, t in enumerate(config["towers"]):
        TowerConfig.from_config(config, t["field"], t["backbone"], f"config key towers[{i}]")
    _check_scheme(config)
    for name in config.get("method_train") or {}:
        methods.get(name, f"config key method_train.{name}")
    known = config["dataset_sources"]
    for key in ("dataset_train", "dataset_model"):
        for name in config.get(key) or {}:
            if name not in known:
                raise ValueError(f"config key {key}.{name}: no such dataset under dataset_sources (known: {', '.join(known)})")
    _check_max_len(config)
    # the configured tables and figures, and the methods table's rows whether built or not
    for name in dict.fromkeys([*(config.get("tables") or []), *(config.get("figures") or []), "methods"]):
        t = tables.get(name, "config key tables/figures")
        key = t.section or name
        with _naming(key):
            if t.check:
                t.check(config)
            for d in tables.table_datasets(config, name):
                if d not in known:
                    raise ValueError(f"config key {key}: dataset {d!r} is not under dataset_sources (known: {', '.join(known)})")
            _check_runs(config, name)


@contextmanager
def _naming(key: str):
    """Prefix `config key <key>: ` to a ValueError that names no config key; a KeyError (a
    setting the planning of `key` reads and the config leaves out) becomes such a ValueError."""
    try:
        yield
    except ValueError as err:
        if "config key " in str(err):
            raise
        raise ValueError(f"config key {key}: {err}") from None
    except KeyError as err:
        raise ValueError(f"config key {key}: needs the setting {err.args[0]!r}, which the config leaves out") from None


def _check_scheme(config: dict) -> None:
    """`default_scheme` keeps blocks every tower's backbone has."""
    from iisan.training.layerdrop import scheme_layers

    scheme = config["default_scheme"]
    for t in config["towers"]:
        with _naming("default_scheme"):
            scheme_layers(scheme, config["backbones"][t["backbone"]]["layers"], include_h0=False)


def _check_max_len(config: dict) -> None:
    """The user encoder's T (`model.max_len`, per dataset `dataset_model.<d>.max_len`) fits the
    windows preprocessing keeps: T input items before the validation and the test target."""
    from iisan.config import ModelConfig

    window = config["preprocess"]["window"]
    places = {"model": config.get("model") or {}}
    places.update({f"dataset_model.{d}": m or {} for d, m in (config.get("dataset_model") or {}).items()})
    for where, model in places.items():
        t = model.get("max_len", ModelConfig.max_len)
        if t + 3 > window:
            raise ValueError(f"config key {where}.max_len: {t} input positions need preprocess.window >= {t + 3} "
                             f"(it is {window}: each user keeps T = window - 3 items before the validation target)")


def _check_runs(config: dict, name: str) -> None:
    """Every run table (or figure) `name` plans: its experiment (first seed), the layers each
    tower keeps, and the caches it reads."""
    kind = tables.runs_entry(name).runs
    if kind == "cache":
        tables.fig6_caches(config)
        return
    if kind == "profile":
        tables.efficiency_plan(config)
    seed = config["seeds"][0]
    for dataset in tables.table_datasets(config, name):
        for row in tables.table_plan(name, config):
            w = plan.run_wildcards(dataset, row)
            exp = plan.experiment(config, dataset, w["towers"], w["method"], w["scheme"], w["cache"], seed)
            for i in range(len(exp.towers)):
                exp.tower_layers(i)
            plan.run_caches(config, dataset, w["towers"], w["method"], w["scheme"], w["cache"])


def workflow_config(root: Path | str = ".", files: tuple[str, ...] | list[str] = (), overrides: dict | None = None) -> dict:
    """The config a run of the Snakefile in `root` sees: config/config.yaml, then the `files`
    (--configfile), then the `overrides` (--config key=value, read as YAML), validated with its
    defaults filled in and checked. Needs Snakemake (the `workflow` extra)."""
    from snakemake.utils import update_config

    root = Path(root)
    config: dict = {}
    for f in (DEFAULT_CONFIG, *files):
        update_config(config, load_yaml(Path(f) if Path(f).is_absolute() else root / f))
    update_config(config, typed(overrides or {}))
    validate(config, root)
    check_config(config)
    return config


FUTURE_SLACK_S = 300  # how far ahead of this machine's clock a file's time may be before it is reported
FUTURE_SCAN_S = 20.0  # the most seconds the scan takes (a slow network filesystem): what it saw by then is reported


def future_files(folders=("results", "resources"), slack_s: float = FUTURE_SLACK_S, now: float | None = None,
                 budget_s: float = FUTURE_SCAN_S) -> tuple[list[tuple[Path, float]], bool]:
    """The files and folders under `folders` (relative to the working directory) whose
    modification time is more than `slack_s` seconds ahead of `now` (default: this machine's
    clock), with how many seconds ahead each is, furthest ahead first; and whether the scan
    saw everything (False: it stopped after `budget_s` seconds). `folders` themselves may be
    symbolic links (to a scratch filesystem); links below them are judged by their own time and
    not followed."""
    now = time.time() if now is None else now
    deadline = time.monotonic() + budget_s
    ahead: list[tuple[Path, float]] = []
    todo = [Path(f) for f in folders if Path(f).is_dir()]
    for top in todo:
        mtime = top.stat().st_mtime
        if mtime > now + slack_s:
            ahead.append((top, mtime - now))
    while todo:
        if time.monotonic() >= deadline:
            return sorted(ahead, key=lambda x: -x[1]), False
        folder = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            try:
                mtime = e.stat(follow_symlinks=False).st_mtime
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
            except OSError:
                continue
            if mtime > now + slack_s:
                ahead.append((Path(e.path), mtime - now))
    return sorted(ahead, key=lambda x: -x[1]), True


def future_files_warning(ahead: list[tuple[Path, float]], complete: bool = True, shown: int = 10) -> str | None:
    """The warning about files dated ahead of the clock (`future_files`), or None when there are
    none: the first `shown` of them with how far ahead, what it means for a run, and what to do."""
    if not ahead:
        return None

    def span(s: float) -> str:
        return f"{s / 86400:.1f} days" if s >= 86400 else f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"

    lines = [f"warning: {len(ahead)} file{'s' if len(ahead) > 1 else ''} under results/ or resources/ "
             f"{'are' if len(ahead) > 1 else 'is'} dated ahead of this machine's clock"
             f"{'' if complete else ' (the scan stopped before the end; there may be more)'}:"]
    lines += [f"  {p} ({span(s)} ahead)" for p, s in ahead[:shown]]
    if len(ahead) > shown:
        lines.append(f"  ... and {len(ahead) - shown} more")
    lines.append(
        "Until the clock reaches their dates, Snakemake takes them for newer than anything made since: it may not "
        "rerun what makes them when its inputs change (a table dated ahead does not take in a run retrained since), "
        "and may rerun what is made from them every time. Usually a clock differs between the machine or file "
        "server that wrote them and this one: fix that clock, or give the files this machine's time "
        "(`touch -d now <file>`; a plain `touch` on a network filesystem may take the server's clock), then rerun."
    )
    return "\n".join(lines)


def warn_future_files(folders=("results", "resources"), slack_s: float = FUTURE_SLACK_S, file=None) -> list[tuple[Path, float]]:
    """Print `future_files_warning` to stderr (or `file`) if any file under `folders` is dated
    more than `slack_s` seconds ahead of now; return those files. Only reads: the Snakefile calls
    it when a run starts, in Snakemake's main process."""
    ahead, complete = future_files(folders, slack_s)
    text = future_files_warning(ahead, complete)
    if text:
        print(text, file=file or sys.stderr, flush=True)
    return ahead


class StaleReportError(NamedError):
    """A report asked for while a table or figure stands for runs that are gone or newer."""


def stale_outputs(config: dict) -> list[str]:
    """The tables and figures of the config that exist but no longer stand for their runs: a
    run's result (metrics.json, a profile) is missing or newer than the table. One line each,
    naming the output and up to three of its runs."""
    out = []
    names = [*config["tables"], *config["figures"]]
    for name in names:
        t, runs = tables.get(name), tables.runs_entry(name)
        if runs.runs == "profile":
            paths = [p for _, p in tables.efficiency_plan(config)]
        elif runs.runs == "train" and runs.rows:
            paths = [p for _, p in tables.plan_runs(name, config)]
        else:
            continue
        target = Path(plan.FIGURE.format(figure=name) if t.figure else tables.table_file(config, name))
        if not target.exists():
            continue
        made = target.stat().st_mtime
        gone = [p for p in dict.fromkeys(paths) if not Path(p).exists()]
        newer = [p for p in dict.fromkeys(paths) if Path(p).exists() and Path(p).stat().st_mtime > made]
        for what, files in (("gone", gone), ("newer than it", newer)):
            if files:
                more = f" and {len(files) - 3} more" if len(files) > 3 else ""
                out.append(f"{target}: {len(files)} of its {len(set(paths))} runs are {what}: {', '.join(files[:3])}{more}")
    return out


def refuse_stale_report(config: dict) -> None:
    """Raise StaleReportError when a report would pack tables or figures whose runs are gone or
    were remade since (`stale_outputs`); the Snakefile calls it before `--report`."""
    stale = stale_outputs(config)
    if stale:
        raise StaleReportError(
            "the report would show tables or figures that no longer stand for their runs:\n  " + "\n  ".join(stale)
            + "\nrun the workflow to completion first (it retrains what is gone and rebuilds these), then ask for the report")
