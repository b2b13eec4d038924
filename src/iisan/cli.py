"""`iisan` command line: a config's GPU-hour budget (plan) and a warm worker for train jobs (worker).

    iisan plan [TARGET ...] --configfile config/paper.yaml [--config KEY=VALUE ...] [--rates FILE] [--jobs jobs.csv] [--gpus N]
    iisan worker [--socket PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def plan(args: argparse.Namespace) -> int:
    from iisan.encoders.models_fetch import disk_report
    from iisan.pipeline.budget import GPU_RULES, Budget, load_rates, render, render_cards, render_videos, write_jobs
    from iisan.pipeline.graph import job_graph
    from iisan.pipeline.workflow import load_yaml

    overrides = {}
    for item in args.config or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"iisan plan: --config {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key] = value
    try:  # the jobs Snakemake would run for these targets and this config
        for f in args.configfile or []:  # a YAML error named with its file, line and column
            load_yaml(f if Path(f).is_absolute() else Path(args.directory) / f)
        graph = job_graph(args.directory, args.configfile or [], overrides, args.targets or [])
    except Exception as err:  # a missing file or input, a schema or registry error: say which and stop
        print(f"iisan plan: {str(err).strip() or type(err).__name__}", file=sys.stderr)
        return 2
    config = graph.config
    node = int(config["cluster"].get("node_gpus", 1))
    if args.gpus is not None and args.gpus >= 1:  # runs priced on a node of --gpus cards
        config = {**config, "cluster": {**config["cluster"], "node_gpus": args.gpus}}
    cwd = os.getcwd()
    os.chdir(args.directory)  # dataset sizes are read from the workflow's resources/
    try:
        budget = Budget(config, load_rates(args.rates)).build(graph)
    finally:
        os.chdir(cwd)
    print(render(budget))
    print(disk_report(budget))
    if videos := render_videos(budget):
        print(videos)
    limit = graph.config["cluster"]["max_runtime_min"]
    if limit:
        margin = graph.config["cluster"]["runtime_margin"]
        attempts = {j.name: math.ceil(j.seconds * margin / 60 / limit) for j in budget.jobs.values()}
        most = max(attempts.values(), default=1)
        if most > 1:
            print(f"at cluster.max_runtime_min = {limit}, {sum(a > 1 for a in attempts.values())} jobs resume over several attempts, "
                  f"at most {most} ({max(attempts, key=attempts.get)}): run snakemake with --retries {most - 1} or more")
    if args.gpus is None and budget.node_gpus() > 1:
        print(render_cards(budget))
    if args.gpus is not None:
        from iisan.pipeline.schedule import ORDERS, chains, critical_path, random_walls, wall_seconds

        jobs = list(budget.jobs.values())
        priority = {j.name: j.priority for j in jobs}
        try:
            wall = wall_seconds(jobs, args.gpus, priority)
            walls = random_walls(jobs, args.gpus, ORDERS)
            chain = chains(jobs)
            path = critical_path(jobs, args.gpus, priority)
        except ValueError as err:
            print(f"iisan plan --gpus {args.gpus}: {err}", file=sys.stderr)
            return 2
        gpus = f"{args.gpus} GPU{'s' * (args.gpus != 1)}"
        card_hours = sum(j.card_seconds for j in jobs) / 3600
        longest = max(chain, key=chain.get, default="")
        held = sum(j.seconds * min(j.gpus, args.gpus) for j in jobs) / 3600  # a job of more cards than there are takes them all
        bound = max(chain.get(longest, 0) / 3600, held / args.gpus)
        print(f"wall time on {gpus}: {wall / 3600:.1f} h (GPU hours {sum(j.seconds for j in jobs) / 3600:.1f}) longest chain first, "
              f"{min(walls) / 3600:.1f}–{max(walls) / 3600:.1f} h in random orders (card-hours {card_hours:.1f})\n"
              f"(a list schedule, iisan.pipeline.schedule: whenever cards free up, the ready job with the longest chain of GPU work after it "
              f"starts, each on cards of its own; {ORDERS} seeded random orders for the range; no order ends before {bound:.1f} h: "
              f"the longest chain, {chain.get(longest, 0) / 3600:.1f} h from {longest or '-'}, or {held:.1f} card-hours over {gpus})\n"
              f"{render_cards(budget)}")
        print(f"critical path (the chain of jobs that sets the wall time, each after a job it waits for or the one that freed "
              f"its cards): {_path(path, wall) or '-'}")
        if args.gpus != node:
            print(f"priced with runs spread over up to {args.gpus} cards (--gpus); the workflow's rules ask with "
                  f"cluster.node_gpus = {node}: set it to {args.gpus} to run as planned")
        set_by_rules = [n.priority for n in graph.nodes if n.rule in GPU_RULES]
        if not any(set_by_rules):
            print("The workflow's GPU rules set no priority: Snakemake then starts ready jobs in no set order (the random range); "
                  "`priority:` from iisan.pipeline.budget.Budget.priority gives the first figure.")
        for j in jobs:
            if j.gpus > args.gpus:
                print(f"{j.name} asks for {j.gpus} GPUs and gets {args.gpus}: it may not fit them")
    if args.jobs:
        write_jobs(budget, args.jobs)
        print(f"every job: {args.jobs}")
    return 0


def _cards(n: int) -> str:
    return "no card" if n == 0 else f"{n} card{'s' * (n != 1)}"


def _path(path: list, wall: float) -> str:
    """The critical path's jobs with their hours and cards, those under 2 % of the wall time
    together as one entry per stretch of them."""
    out, short = [], []

    def close():
        if short:
            out.append(f"[{len(short)} short job{'s' * (len(short) != 1)}, {sum(j.seconds for j in short) / 3600:.1f} h]")
            short.clear()

    for j in path:
        if j.seconds < 0.02 * wall:
            short.append(j)
            continue
        close()
        out.append(f"{j.name} ({j.seconds / 3600:.1f} h, {_cards(j.gpus)})")
    close()
    return " -> ".join(out)


def worker(args: argparse.Namespace) -> int:
    from iisan.pipeline.worker import PRELOAD, serve

    try:
        serve(args.socket.resolve(), preload=PRELOAD + tuple(args.preload or ()), exit_with_parent=args.exit_with_parent)
    except (RuntimeError, ValueError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="iisan", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="GPU hours and peak GPU memory of every job a config's targets need, per table and in total")
    p.add_argument("targets", nargs="*", metavar="TARGET", help="output files, as snakemake's targets (default: the config's tables and figures)")
    p.add_argument("--configfile", nargs="+", help="config files over config/config.yaml, as snakemake --configfile")
    p.add_argument("--config", nargs="+", metavar="KEY=VALUE", help="config overrides, as snakemake --config")
    p.add_argument("--rates", type=Path,
                   help="reference rates with their provenance (default: the package's rates.yaml, measured on an H200 and an H100)")
    p.add_argument("--jobs", type=Path,
                   help="also write every job (kind, output, cards, GPU hours, card-hours, peak GiB, priority, tables) to this CSV")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="also the wall time of the jobs on one machine with N GPUs, longest chain first and in random orders, "
                        "and its critical path; training runs are spread over up to N of them (default: cluster.node_gpus)")
    p.add_argument("--directory", "-d", type=Path, default=Path("."), help="the workflow's folder (default: .)")
    from iisan.pipeline.worker import ENV, default_socket

    w = sub.add_parser("worker", help="import torch, the compiler and this library once and run each train job "
                       f"that finds it (through ${ENV}) in a forked child, without those imports")
    w.add_argument("--socket", type=Path, default=default_socket(), help="where to listen (default: %(default)s)")
    w.add_argument("--preload", nargs="+", metavar="MODULE", help="more modules to import first (your own backbone or dataset code)")
    w.add_argument("--exit-with-parent", action="store_true", help="stop when the process that started it ends (how Snakemake starts one)")
    args = ap.parse_args(argv)
    return {"plan": plan, "worker": worker}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
