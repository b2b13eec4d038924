"""The config a workflow run sees: the schema (config/schemas/config.schema.yaml, with each table
section's schema from the table registry), its defaults, and the checks no schema can make.

The Snakefile calls `validate` and `check_config`; `workflow_config` does what a run does for
Python callers (`iisan plan`, tests).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from . import methods, tables
from .config import TowerConfig, typed

SCHEMA = "config/schemas/config.schema.yaml"


def schema(root: Path | str = ".") -> dict:
    """The config schema: the file's, with every registered table section and the registry's
    names as the only `tables` and `figures`."""
    out = yaml.safe_load((Path(root) / SCHEMA).read_text(encoding="utf-8"))
    props = out["properties"]
    for t in tables.TABLES.values():
        if t.section and t.schema:
            if t.section in props:
                raise ValueError(f"{SCHEMA}: key {t.section!r} is also the section of table {t.name!r} (iisan.tables)")
            props[t.section] = copy.deepcopy(t.schema)
    props["tables"]["items"]["enum"] = tables.names(figures=False)
    props["figures"]["items"]["enum"] = tables.names(figures=True)
    return out


def validate(config: dict, root: Path | str = ".") -> dict:
    """Check `config` against the schema and fill in its defaults (in place); a violation raises
    ValueError naming the key."""
    import jsonschema
    from jsonschema import Draft202012Validator, validators

    def set_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, sch)

    Validator = validators.extend(Draft202012Validator, {"properties": set_defaults})
    try:
        Validator(schema(root)).validate(config)
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ValueError(f"config key {where}: {err.message}") from None
    return config


def check_config(config: dict) -> None:
    """What the schema cannot check: tower fields against backbone modalities, method names
    against the method registry, datasets named by other keys, and each configured table's own
    checks (iisan.tables). Errors name the config key."""
    for i, t in enumerate(config["towers"]):
        TowerConfig.from_config(config, t["field"], t["backbone"], f"config key towers[{i}]")
    for name in config.get("method_train") or {}:
        methods.get(name, f"config key method_train.{name}")
    known = config["dataset_sources"]
    for key in ("dataset_train", "dataset_model"):
        for name in config.get(key) or {}:
            if name not in known:
                raise ValueError(f"config key {key}.{name}: no such dataset under dataset_sources (known: {', '.join(known)})")
    # the configured tables and figures, and the methods table's rows whether built or not
    for name in dict.fromkeys([*(config.get("tables") or []), *(config.get("figures") or []), "methods"]):
        t = tables.get(name, "config key tables/figures")
        if t.check:
            t.check(config)
        for d in tables.table_datasets(config, name):
            if d not in known:
                raise ValueError(f"config key {t.section or name}: dataset {d!r} is not under dataset_sources "
                                 f"(known: {', '.join(known)})")


def workflow_config(root: Path | str = ".", files: tuple[str, ...] | list[str] = (), overrides: dict | None = None) -> dict:
    """The config a run of the Snakefile in `root` sees: config/config.yaml, then the `files`
    (--configfile), then the `overrides` (--config key=value, read as YAML), validated with its
    defaults filled in and checked. Needs Snakemake (the `workflow` extra)."""
    from snakemake.utils import update_config

    root = Path(root)
    config: dict = {}
    for f in ("config/config.yaml", *files):
        path = Path(f) if Path(f).is_absolute() else root / f
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        update_config(config, yaml.safe_load(path.read_text()) or {})
    update_config(config, typed(overrides or {}))
    validate(config, root)
    check_config(config)
    return config
