"""A config's `methods` table without Snakemake, for machines that have the library but not the
workflow engine (the GPU machine of docs/benchmarks.md has no snakemake). It makes the same
library calls as the rules, in the same folders (`iisan.plan` path templates, relative to
--work): preprocess, cache every tower's backbone, prune to each run's scheme, train every run
(`run_experiment`, the speed settings of the config), build the table. Backbones whose source is
a package or PyPI parts are read from folders given with --model NAME=DIR.

    PYTHONPATH=src python benchmarks/methods_table.py --config config/amazon-real-text.yaml \\
        --mirror ../shared/data/amazon --model minilm-l6=DIR --model mpnet-base=DIR --work /tmp/w [--dry]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from iisan import plan, tables
from iisan.backbones import BackboneSpec, output_layer
from iisan.layerdrop import scheme_layers, tower_schemes
from iisan.workflow import check_config

ROOT = Path(__file__).resolve().parents[1]


def merge(base: dict, over: dict) -> dict:
    """Snakemake's update_config: nested dicts merged, everything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(files: list[str]) -> dict:
    cfg = {}
    for f in ["config/config.yaml", *files]:
        cfg = merge(cfg, yaml.safe_load((ROOT / f).read_text()))
    cfg.setdefault("va_stride", "authors")  # schema defaults the files leave out
    cfg.setdefault("keep_checkpoints", False)
    check_config(cfg)
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", nargs="+", required=True)
    ap.add_argument("--mirror", required=True)
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR: load registry backbone NAME from DIR")
    ap.add_argument("--work", required=True)
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    cfg = load_config(args.config)
    models = dict(m.split("=", 1) for m in args.model)
    work = Path(args.work)
    (dataset,) = cfg["datasets"]
    runs = tables.plan_runs("methods", cfg)
    rows = tables.table_plan("methods", cfg)
    jobs = []
    for row in rows:
        w = plan.run_wildcards(dataset, row)
        caches = plan.run_caches(cfg, **w)
        schemes = tower_schemes(w["scheme"], len(row["towers"]))
        jobs.append((row, w, caches, schemes))
        print(json.dumps({"row": row["label"], "run": w, "caches": caches}), flush=True)
    if args.dry:
        return
    from iisan.cache import build_cache, prune_cache
    from iisan.data.amazon import preprocess
    from iisan.experiment import run_experiment
    from iisan.tables import build_table

    src = cfg["dataset_sources"][dataset]
    ds_dir = work / plan.DATASET_DIR.format(dataset=dataset)
    t0 = time.perf_counter()
    if not (ds_dir / "stats.json").exists():
        preprocess(Path(args.mirror) / src["items"], Path(args.mirror) / src["users"], ds_dir, bad_lines=cfg["bad_lines"],
                   **cfg["preprocess"])
    timings = {"preprocess_s": round(time.perf_counter() - t0, 1)}
    for row, _, caches, schemes in jobs:
        for t, cdir, scheme in zip(row["towers"], caches, schemes):
            entry = cfg["backbones"][t["backbone"]]
            spec = BackboneSpec.from_config(t["backbone"], entry)
            full = work / plan.cache_dir(dataset, t["field"], t["backbone"])
            if not (full / "manifest.json").exists():
                t0 = time.perf_counter()
                build_cache(spec, models.get(t["backbone"], entry["source"]), ds_dir / "items.parquet", t["field"], full,
                            batch_size=cfg["cache"]["batch_size"], store_dtype=spec.cache_dtype(cfg["cache"]["dtype"]),
                            progress=False)
                timings[f"cache {t['backbone']}_s"] = round(time.perf_counter() - t0, 1)
            if not (work / cdir / "manifest.json").exists():
                layers = scheme_layers(scheme, spec.layers, cfg["include_h0"], output_layer(spec.family, spec.layers))
                prune_cache(full, work / cdir, layers)
    metrics = []
    for desc, path in runs:
        row, w, caches, _ = next(j for j in jobs if j[0]["label"] == desc["label"])
        exp = plan.experiment(cfg, **w, seed=desc["seed"]).with_speed(cfg.get("speed"))
        out = work / path
        if not out.exists():
            t0 = time.perf_counter()
            run_experiment(exp, ds_dir, [work / c for c in caches], out)
            timings[f"run {desc['label']}_s"] = round(time.perf_counter() - t0, 1)
        metrics.append(out)
    table = work / tables.table_file(cfg, "methods")
    df = build_table("methods", [d for d, _ in runs], metrics, table)
    print(df, flush=True)
    print(json.dumps({"timings": timings, "table": str(table)}), flush=True)


if __name__ == "__main__":
    main()
