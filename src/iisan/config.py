"""Workflow configuration helpers."""

from __future__ import annotations

from typing import Any

import yaml


def typed(value: Any) -> Any:
    """Read a `--config key=value` value the way a config file would be read.

    Snakemake turns `--config` values into ints or floats, but leaves `true`, `[1, 2]` and the
    leaves of `{max_epochs: 3}` as strings. Strings are read as YAML here (with Python's float
    syntax too, so `1e-4` is a number); lists and mappings are read element by element.
    """
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
        try:
            return yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
    if isinstance(value, list | tuple):
        return [typed(v) for v in value]
    if hasattr(value, "items"):
        return {k: typed(v) for k, v in value.items()}
    return value
