"""`iisan` command line: one sub-command per workflow stage (the Snakemake rules call these)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zlib
from pathlib import Path

log = logging.getLogger("iisan")


def _setup(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_demo_data(a):
    from .data.demo import DemoSpec, generate

    spec = DemoSpec(**json.loads(a.spec))
    generate(Path(a.out), spec)


def cmd_fetch(a):
    from .download import fetch

    fetch(a.relpath, Path(a.out), base_url=a.base_url, mirror=a.mirror or None, expected_sha256=a.sha256 or None)


def cmd_preprocess(a):
    from .data.amazon import preprocess

    stats = preprocess(
        Path(a.items), Path(a.users), Path(a.out),
        min_interactions=a.min_interactions, window=a.window, bad_lines=a.bad_lines,
        images=Path(a.images) if a.images else None, missing_images=a.missing_images,
    )
    log.info("preprocessed %s: %d users, %d items, %d interactions", a.out, stats["users"], stats["items"], stats["interactions"])


def cmd_standin(a):
    import polars as pl

    from .backbones import BackboneSpec, build_standin

    spec = BackboneSpec.from_config(a.name, json.loads(a.spec))
    titles = pl.read_parquet(a.titles)["title"].to_list() if a.titles else None
    # each stand-in gets its own weights (two registry entries with the same shape, e.g. the
    # Llama-2 and Llama-3 stand-ins, must not be the same model)
    seed = a.seed if a.seed is not None else zlib.crc32(a.name.encode()) % 2**31
    build_standin(spec, Path(a.out), titles, seed=seed)


def cmd_cache(a):
    from .backbones import BackboneSpec, resolve_source
    from .cache import build_cache

    spec = BackboneSpec.from_config(a.name, json.loads(a.spec))
    path = resolve_source(spec, Path(a.standin) if a.standin else None)
    build_cache(spec, path, Path(a.items), a.field, Path(a.out), images_archive=Path(a.images) if a.images else None,
                batch_size=a.batch_size, store_dtype=a.store_dtype)


def cmd_prune(a):
    from .cache import prune_cache

    prune_cache(Path(a.src), Path(a.out), [int(x) for x in a.layers.split(",")])


def _speed(a) -> dict:
    knobs = (("cuda_graphs", a.cuda_graphs), ("eval_batch", a.eval_batch), ("compile", a.compile),
             ("checkpoint_every_s", a.checkpoint_every_s))
    return {**json.loads(a.speed), **{k: v for k, v in knobs if v is not None}}


def cmd_train(a):
    from .experiment import run_experiment

    run_experiment(json.loads(a.experiment), Path(a.dataset), [Path(c) for c in a.caches], Path(a.out), device=a.device,
                   speed=_speed(a), backbones=json.loads(a.backbones) if a.backbones else None, images=a.images or None,
                   keep_checkpoint=a.keep_checkpoint)


def cmd_profile(a):
    from .experiment import profile_experiment

    profile_experiment(json.loads(a.experiment), Path(a.dataset), [Path(c) for c in a.caches], Path(a.out),
                       batch_size=a.batch_size, steps=a.steps, device=a.device, speed=_speed(a),
                       backbones=json.loads(a.backbones) if a.backbones else None, images=a.images or None)


def cmd_efficiency(a):
    from .tables import build_efficiency

    build_efficiency(json.loads(a.rows), [Path(m) for m in a.profiles], Path(a.out), Path(a.figure) if a.figure else None)


def cmd_table(a):
    from .tables import build_table

    build_table(a.kind, json.loads(a.rows), [Path(m) for m in a.metrics], Path(a.out))


def cmd_figure(a):
    from . import figures

    out = Path(a.out)
    metrics = [Path(m) for m in a.metrics]
    if a.kind == "fig4":
        figures.fig4(json.loads(a.rows), metrics, out)
    elif a.kind == "fig6":
        figures.fig6(json.loads(a.backbones), metrics, a.items, out, out.with_suffix(".csv"), demo=a.demo)
    elif a.kind == "fig7":
        figures.fig7(json.loads(a.rows), metrics, out, out.with_suffix(".csv"))
    else:
        raise SystemExit(f"unknown figure {a.kind!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iisan", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("demo-data", help="generate the demo dataset (raw TSV + image zip)")
    s.add_argument("--out", required=True)
    s.add_argument("--spec", default="{}", help="JSON object of DemoSpec fields")
    s.set_defaults(fn=cmd_demo_data)

    s = sub.add_parser("fetch", help="download one published file (or copy it from a mirror)")
    s.add_argument("--relpath", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--base-url", required=True)
    s.add_argument("--mirror", default="")
    s.add_argument("--sha256", default="")
    s.set_defaults(fn=cmd_fetch)

    s = sub.add_parser("preprocess", help="items/users TSV -> Parquet (docs/method.md §1)")
    s.add_argument("--items", required=True)
    s.add_argument("--users", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--images", default="")
    s.add_argument("--missing-images", default="error", choices=["error", "blank"])
    s.add_argument("--bad-lines", default="error", choices=["error", "skip"])
    s.add_argument("--min-interactions", type=int, default=5)
    s.add_argument("--window", type=int, default=13)
    s.set_defaults(fn=cmd_preprocess)

    s = sub.add_parser("standin", help="build a randomly initialised demo backbone")
    s.add_argument("--name", required=True)
    s.add_argument("--spec", required=True, help="JSON registry entry")
    s.add_argument("--titles", default="", help="items.parquet whose titles train the tokenizer")
    s.add_argument("--seed", type=int, default=None, help="default: derived from the name")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_standin)

    s = sub.add_parser("cache", help="cache every hidden state of one backbone over one item field")
    s.add_argument("--name", required=True)
    s.add_argument("--spec", required=True, help="JSON registry entry")
    s.add_argument("--standin", default="")
    s.add_argument("--items", required=True)
    s.add_argument("--field", required=True)
    s.add_argument("--images", default="")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--store-dtype", default="float16")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_cache)

    s = sub.add_parser("prune", help="keep only some hidden states of a cache")
    s.add_argument("--src", required=True)
    s.add_argument("--layers", required=True, help="comma-separated indices into h[0..L]")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_prune)

    for name, helptext in (("train", "train and evaluate one experiment"),
                           ("profile", "time a few training steps at one batch size and read the peak memory")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--experiment", required=True, help="JSON experiment description")
        s.add_argument("--dataset", required=True, help="preprocessed dataset folder")
        s.add_argument("--caches", nargs="*", default=[], help="one cache folder per tower, in tower order (none for uncached runs)")
        s.add_argument("--backbones", default="", help="uncached runs: JSON list of {spec, path}, one per tower")
        s.add_argument("--images", default="", help="uncached runs: the dataset's image archive")
        s.add_argument("--out", required=True, help="JSON file to write")
        s.add_argument("--device", default=None)
        s.add_argument("--speed", default="{}", help="JSON of speed-only TrainConfig fields (cuda_graphs, eval_batch)")
        s.add_argument("--cuda-graphs", type=lambda v: bool(int(v)), default=None, help="1/0: capture the training step as a CUDA graph")
        s.add_argument("--eval-batch", type=int, default=None, help="users per evaluation chunk")
        s.add_argument("--compile", type=lambda v: bool(int(v)), default=None, help="1/0: torch.compile the item and user encoders (CUDA)")
        s.add_argument("--checkpoint-every-s", type=float, default=None,
                       help="seconds between training checkpoints (0: after every epoch)")
        s.add_argument("--threads", type=int, default=0)
        if name == "train":
            s.add_argument("--keep-checkpoint", type=lambda v: bool(int(v)), default=False,
                           help="1/0: keep checkpoint.pt (saved beside --out every epoch, resumed on restart) after the run")
        if name == "profile":
            s.add_argument("--batch-size", type=int, required=True)
            s.add_argument("--steps", type=int, default=10, help="timed steps (after 4 warm-up steps)")
        s.set_defaults(fn=cmd_train if name == "train" else cmd_profile)

    s = sub.add_parser("efficiency", help="profiles -> results/efficiency.csv (+ Fig. 5)")
    s.add_argument("--rows", required=True, help="JSON list of row descriptions, aligned with --profiles")
    s.add_argument("--profiles", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--figure", default="", help="fig5.png to draw")
    s.set_defaults(fn=cmd_efficiency)

    s = sub.add_parser("table", help="aggregate metrics into a paper table")
    s.add_argument("--kind", required=True)
    s.add_argument("--rows", required=True, help="JSON list of row descriptions, aligned with --metrics")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_table)

    s = sub.add_parser("figure", help="draw a paper figure (fig4, fig6, fig7)")
    s.add_argument("--kind", required=True)
    s.add_argument("--rows", default="[]")
    s.add_argument("--metrics", nargs="*", default=[], help="metrics.json files (fig6: cache manifests)")
    s.add_argument("--backbones", default="{}", help="fig6: JSON backbone registry")
    s.add_argument("--items", type=int, default=20825, help="fig6: items for the computed sizes")
    s.add_argument("--demo", action="store_true", help="fig6: draw the demo stand-ins instead of the real backbones")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_figure)

    args = p.parse_args(argv)
    _setup(args)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
