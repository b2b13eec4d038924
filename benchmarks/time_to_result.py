"""One cached IISAN-VS experiment from process start to metrics.json at Scientific size, the way the
train rule runs it: a fresh Python process that imports the library, loads the dataset and the two
pruned caches from disk (manifests and checksums checked), builds the model, trains 100 epochs with
a validation pass after each, evaluates the best epoch and writes metrics.json.

`--work DIR` first writes a synthetic Scientific-sized dataset folder (12,076 users, 20,314
items) and two BERT-base / ViT-base shaped pruned caches (7 states x 768, float32, the paper's
storage) in the library's formats, then runs the experiment `--runs` times in fresh processes
that share one inductor cache folder (TORCHINDUCTOR_CACHE_DIR, as the workflow's jobs do), so the
first run compiles and the next ones read compiled kernels from that cache. Patience is set to the
epoch count so every run trains all epochs. Prints one JSON line per run with the breakdown:

    PYTHONPATH=src:benchmarks python benchmarks/time_to_result.py --work /tmp/ttr [--runs 2] [--epochs 100]
        [--speed '{"compile": false}'] [--worker]
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # as close to process start as Python allows (the interpreter's own start is added below)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from iisan.pipeline.worker import start_for_workflow, stop_for_workflow  # noqa: E402 - light: no torch

ROOT = Path(__file__).resolve().parents[1]
TOWERS = [("title", "bert-base"), ("image", "vit-base")]


def process_age() -> float:
    """Seconds since this process started (Linux: /proc/self/stat field 22, in clock ticks since boot)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def config() -> dict:
    """The config a run of the Snakefile sees with config/paper.yaml (defaults filled, checked)."""
    from iisan.pipeline.workflow import workflow_config

    return workflow_config(ROOT, ["config/paper.yaml"])


def experiment(cfg: dict, epochs: int, speed: dict):
    import dataclasses

    from iisan.config import Experiment, TowerConfig

    towers = [TowerConfig.from_config(cfg, f, b, "benchmark") for f, b in TOWERS]
    exp = Experiment.from_config(cfg, "Scientific", towers, "iisan", cfg["default_scheme"], "dropped", 12345)
    exp = exp.with_speed({**cfg["speed"], **speed})
    return dataclasses.replace(exp, train=dataclasses.replace(exp.train, max_epochs=epochs, patience=epochs))


def prepare(work: Path, cfg: dict) -> None:
    """The dataset folder and the pruned caches, in the formats preprocessing and pruning write."""
    import numpy as np
    import polars as pl

    from iisan.data.synthetic import synthetic_sequences
    from iisan.encoders.backbones import output_layer
    from iisan.encoders.cache_files import ARRAY, file_checksum, write_manifest
    from iisan.io import write_json

    data_dir = work / "Scientific"
    if (data_dir / "stats.json").exists():
        return
    seqs, items = synthetic_sequences(), 20314
    data_dir.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"sequence": seqs, "train": [s[:-2] for s in seqs], "valid_input": [s[-12:-2] for s in seqs],
                  "valid_target": [s[-2] for s in seqs], "test_input": [s[-11:-1] for s in seqs],
                  "test_target": [s[-1] for s in seqs]}).write_parquet(data_dir / "sequences.parquet")
    counts = np.bincount(np.concatenate([s[:-2] for s in seqs]), minlength=items + 1)
    pl.DataFrame({"item": np.arange(items + 1), "count": counts,
                  "p": np.where(np.arange(items + 1) == 0, 1.0, counts / counts[1:].sum())}).write_parquet(data_dir / "popularity.parquet")
    order = "synthetic-scientific"
    write_json(data_dir / "stats.json", {"users": len(seqs), "items": items, "item_order_hash": order})
    exp = experiment(cfg, 1, {})
    rng = np.random.default_rng(1)
    for t, tower in enumerate(exp.towers):
        spec = tower.backbone_spec()
        layers = exp.tower_layers(t)
        folder = work / "cache" / tower.field / tower.backbone
        folder.mkdir(parents=True, exist_ok=True)
        dtype = spec.cache_dtype(exp.cache_dtype)
        arr = rng.standard_normal((items + 1, len(layers), spec.hidden), dtype=np.float32).astype(dtype)
        arr[0] = 0
        np.save(folder / ARRAY, arr)

        write_manifest(folder, {
            "backbone": tower.backbone, "source": spec.source, "family": spec.family, "modality": spec.modality,
            "field": tower.field, "pooling": spec.pooling, "compute_dtype": "float32", "dtype": dtype,
            "num_layers": spec.layers, "output_layer": output_layer(spec.family, spec.layers), "stored_layers": layers,
            "hidden": spec.hidden, "items": items, "item_order_hash": order, "shape": [items + 1, len(layers), spec.hidden],
            "bytes": (folder / ARRAY).stat().st_size, "checksum": file_checksum(folder / ARRAY), "settings": {},
        })


def child(work: Path, out: Path, epochs: int, speed: dict, profile_init: bool = False,
          script_start: float | None = None, interpreter: float | None = None) -> None:
    """One run, timed from process start (what a train job does after Snakemake starts it):
    `iisan.training.experiment.run_experiment`'s steps with a clock between them. script_start (time.time()
    when the job's script started) and interpreter (seconds from process start to then) are the job
    process's when a warm worker runs this (`--worker`)."""
    script_start = T_PROCESS if script_start is None else script_start
    if interpreter is None:
        interpreter = process_age() - (time.time() - script_start)
    marks = {"interpreter_start_to_script": round(interpreter, 3)}
    import torch

    from iisan.config import SPEED_FIELDS
    from iisan.data.sequences import load_sequences
    from iisan.io import write_json
    from iisan.training.experiment import cached_source
    from iisan.training.train import Trainer, start_run

    cfg = config()
    exp = experiment(cfg, epochs, speed)
    t = time.time()
    marks["imports"] = round(t - script_start, 3)
    caches = [work / "cache" / f / b for f, b in TOWERS]
    # make_trainer's steps, each timed
    dev = start_run(exp.train.seed)  # seeds every random stream, picks the device
    if dev.type == "cuda":
        torch.zeros(1, device=dev)
        torch.cuda.synchronize()
    marks["cuda_init"] = round(time.time() - t, 3)
    t = time.time()
    data = load_sequences(work / "Scientific")
    marks["load_dataset"] = round(time.time() - t, 3)
    t = time.time()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # as make_trainer
        source, layers, info = cached_source(exp, data, caches)
    marks["load_caches (checked, checksums)"] = round(time.time() - t, 3)
    t = time.time()
    if profile_init:  # where the trainer's construction spends its time (cProfile, top 25 by cumulative time)
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            trainer = Trainer(data, source, exp.model, exp.train, dev, run_hash=exp.hash())
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    else:
        trainer = Trainer(data, source, exp.model, exp.train, dev, run_hash=exp.hash())
    trainer.sync()
    marks["trainer (to GPU, model)"] = round(time.time() - t, 3)
    t = time.time()
    result = trainer.fit(progress=False)
    fit_s = time.time() - t
    t = time.time()
    write_json(out, result)
    marks["write_metrics"] = round(time.time() - t, 3)
    h = result["history"]
    train = [e["train_seconds"] for e in h]
    val = [e["epoch_seconds"] - e["train_seconds"] for e in h]
    rest = sorted(train[1:] or train)
    steady = rest[len(rest) // 2]
    marks.update({
        "first_epoch_train": round(train[0], 3),
        "first_epoch_overhead (compile, capture)": round(train[0] - steady, 3),
        "steady_epoch_train": round(steady, 4),
        "validation_per_epoch": round(sorted(val)[len(val) // 2], 4),
        "epochs": len(h),
        "all_epochs_with_validation": round(sum(e["epoch_seconds"] for e in h), 3),
        "final_evaluation": round(fit_s - sum(e["epoch_seconds"] for e in h), 3),
    })
    total = time.time() - script_start + interpreter
    first_step = (marks["interpreter_start_to_script"] + marks["imports"] + marks["cuda_init"] + marks["load_dataset"]
                  + marks["load_caches (checked, checksums)"] + marks["trainer (to GPU, model)"])
    marks["start_up (process start to steady training)"] = round(first_step + marks["first_epoch_overhead (compile, capture)"], 3)
    marks["process_start_to_first_step"] = round(first_step, 3)
    marks["process_start_to_metrics"] = round(total, 3)
    speed = {k: getattr(exp.train, k) for k in SPEED_FIELDS}
    print(json.dumps({"device": result["device"], "torch": torch.__version__, "speed": speed,
                      "peak_memory_mb": round(result["peak_memory_mb"], 1), "valid": result["valid"], **marks}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--speed", default="{}", help="speed settings over the config's, as JSON")
    ap.add_argument("--compile-cache", type=Path, help="inductor cache folder (default: WORK/compile-cache, emptied first)")
    ap.add_argument("--profile-init", action="store_true", help="cProfile the trainer's construction (to stderr)")
    ap.add_argument("--importtime", type=Path, metavar="FILE",
                    help="run the last run under python -X importtime, its log to FILE; print where import time goes")
    ap.add_argument("--worker", action="store_true", help="start an `iisan worker` first; the runs go through it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    speed = json.loads(args.speed)
    if args.child:
        from iisan.pipeline.worker import run  # in a warm worker when IISAN_WORKER is set (--worker), else here

        interpreter = process_age() - (time.time() - T_PROCESS)
        sys.exit(run("time_to_result:child", args.work, args.work / "metrics.json", args.epochs, speed,
                     args.profile_init, T_PROCESS, interpreter))
    t = time.time()
    prepare(args.work, config())
    print(json.dumps({"prepared_s": round(time.time() - t, 1)}), flush=True)
    cache = args.compile_cache or args.work / "compile-cache"
    if args.compile_cache is None:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    # one warm worker for all runs, as `worker: true` starts one for a workflow's run (sets IISAN_WORKER)
    worker = start_for_workflow(args.worker, local=True)
    env = dict(os.environ)
    for run in range(args.runs):
        trace = args.importtime is not None and run == args.runs - 1
        with open(args.importtime if trace else os.devnull, "w") as log:
            subprocess.run([sys.executable] + ["-X", "importtime"] * trace + [__file__, "--child", "--work", str(args.work),
                            "--epochs", str(args.epochs), "--speed", args.speed] + ["--profile-init"] * args.profile_init,
                           env=env, check=True, stderr=log if trace else None)
    stop_for_workflow(worker)
    if args.importtime is not None:
        print(json.dumps(import_summary(args.importtime.read_text())), flush=True)


def import_summary(log: str, top: int = 25) -> dict:
    """From a `python -X importtime` log: seconds of import by top-level package (self times
    summed), and the `top` modules with the largest cumulative time."""
    by_package, modules = {}, []
    for line in log.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0) + int(self_us)
        modules.append((int(cumulative_us), name.rstrip()))
    return {"import_s_by_package": {k: round(v / 1e6, 2) for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])[:top]},
            "import_s_by_module_cumulative": {n: round(c / 1e6, 2) for c, n in sorted(modules, reverse=True)[:top]}}


if __name__ == "__main__":
    main()
