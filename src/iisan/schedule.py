"""Wall time of a config's GPU jobs on one machine with N cards (`iisan plan --gpus N`).

A list schedule, as a local run with `--resources gpu=N` runs them, each job on cards of its own
(iisan.gpus): whenever cards free up, the longest job whose inputs are done and that fits the free
cards starts. A job takes the cards its rule asks for (iisan.budget.Job.gpus: a 34B captioner
two 80 GB cards, a stand-in captioner none). Inputs, found from the jobs' outputs as the workflow
names them (iisan.plan): a cache of a caption field waits for its caption jobs (iisan.shards), a training run or a
Fig. 5 profile for the caches it reads, or, with backbones in the loop, for its captions.
Durations are the budget's (upper bounds: every run to max_epochs); CPU jobs (preprocessing,
pruning, tables) are left out.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable

from . import plan
from .data import CAPTION_FIELDS
from .shards import caption_outputs


def cards(job) -> int:
    """GPUs a job takes at once (1 unless it says)."""
    return int(getattr(job, "gpus", 1))


def _pattern(template: str) -> re.Pattern:
    """A regex matching the paths of a plan template, a group per wildcard."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts)) + "$")


RUN, PROFILE, CACHE = _pattern(plan.RUN_METRICS), _pattern(plan.PROFILE), _pattern(plan.CACHE_ARRAY)


def needs(jobs: Iterable, config: dict) -> dict[str, set[str]]:
    """The GPU jobs each job waits for, by output (those not among `jobs` left out)."""
    jobs = list(jobs)
    names = {j.name for j in jobs}
    out: dict[str, set[str]] = {}
    for j in jobs:
        deps: set[str] = set()
        try:
            if m := CACHE.match(j.name):
                if m["field"] in CAPTION_FIELDS:
                    deps.update(caption_outputs(config, m["dataset"], CAPTION_FIELDS[m["field"]]))
            elif m := RUN.match(j.name) or PROFILE.match(j.name):
                w = {k: m[k] for k in ("dataset", "towers", "method", "scheme", "cache")}
                for folder in plan.run_caches(config, **w):
                    deps.add(plan.array(folder.split("/pruned-")[0]))  # a pruned cache: its full one (pruning is a CPU job)
                if w["cache"] == "none" and w["towers"] != "id":
                    for t in plan.parse_towers(config, w["towers"]):
                        if t.field in CAPTION_FIELDS:
                            deps.update(caption_outputs(config, w["dataset"], CAPTION_FIELDS[t.field]))
        except (KeyError, ValueError):  # a name this config cannot read back: no inputs assumed
            pass
        out[j.name] = deps & names
    return out


def wall_seconds(jobs: Iterable, gpus: int, after: dict[str, set[str]] | None = None) -> float:
    """Seconds from the first job's start to the last one's end on `gpus` cards: a list schedule,
    longest ready job first, a job of k cards on k free cards; `after`: the jobs each waits for
    (needs()). A job asking more cards than there are takes them all, as Snakemake then gives it
    (whether its model fits them is not checked here)."""
    if gpus < 1:
        raise ValueError(f"{gpus} GPUs: expected at least 1")
    jobs = list(jobs)
    after = after or {}

    def take(j) -> int:
        return min(cards(j), gpus)

    waiting = sorted(jobs, key=lambda j: -j.seconds)
    running: list[tuple[float, int, object]] = []
    done: set[str] = set()
    free, now, n = gpus, 0.0, 0
    while waiting or running:
        for j in list(waiting):
            if take(j) <= free and after.get(j.name, set()) <= done:
                waiting.remove(j)
                free -= take(j)
                heapq.heappush(running, (now + j.seconds, n, j))
                n += 1
        if not running:
            raise ValueError(f"{len(waiting)} jobs wait for each other: {', '.join(j.name for j in waiting[:3])}")
        now, _, j = heapq.heappop(running)
        free += take(j)
        done.add(j.name)
    return now
