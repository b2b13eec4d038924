"""Wall time of a config's GPU jobs on one machine with N cards (`iisan plan --gpus N`).

A list schedule, as a local run with `--resources gpu=N` runs them, each job on cards of its own
(iisan.pipeline.gpus): whenever cards free up, the ready job of highest priority that fits the free cards
starts, as Snakemake's greedy scheduler picks its jobs. The priority is the rules' (iisan.pipeline.budget.
Budget.priority): the longest chain of GPU work from a job to the end (`chains`), so the job that
the most work waits for starts first; `wall_seconds` also takes any other order (random ones for
the range an unprioritised run may take, `random_priorities`). A job takes the cards its rule asks
for (iisan.pipeline.budget.Job.gpus: a 34B captioner two 80 GB cards, a stand-in captioner none) and waits
for the GPU jobs upstream of it in Snakemake's DAG (Job.after, from iisan.pipeline.graph). Durations are the
budget's (upper bounds: every run to max_epochs); CPU jobs (preprocessing, pruning, tables) are
left out.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Mapping

ORDERS = 20  # random orders `iisan plan --gpus N` reports the range of


def cards(job) -> int:
    """GPUs a job takes at once (1 unless it says)."""
    return int(getattr(job, "gpus", 1))


def _after(jobs: list) -> dict[str, set[str]]:
    """The jobs each job waits for (`job.after`, by name), those not among `jobs` left out."""
    names = {j.name for j in jobs}
    return {j.name: set(getattr(j, "after", ())) & names for j in jobs}


def chains(jobs: Iterable) -> dict[str, float]:
    """Per job (by name) the seconds of the longest chain of jobs from it to the end: its own
    plus the longest chain among the jobs that wait for it (`job.after`; those not among `jobs`
    left out). A cycle is an error."""
    jobs = list(jobs)
    seconds = {j.name: j.seconds for j in jobs}
    after = _after(jobs)
    waiting: dict[str, list[str]] = {n: [] for n in seconds}
    for name, upstream in after.items():
        for u in upstream:
            waiting[u].append(name)
    left = {n: len(w) for n, w in waiting.items()}  # jobs waiting for it whose chain is not known yet
    todo = [n for n, k in left.items() if k == 0]
    out: dict[str, float] = {}
    while todo:
        n = todo.pop()
        out[n] = seconds[n] + max((out[w] for w in waiting[n]), default=0.0)
        for u in after[n]:
            left[u] -= 1
            if left[u] == 0:
                todo.append(u)
    if len(out) < len(seconds):
        stuck = sorted(set(seconds) - set(out))
        raise ValueError(f"{len(stuck)} jobs wait for each other: {', '.join(stuck[:3])}")
    return out


def random_priorities(jobs: Iterable, seed: int) -> dict[str, int]:
    """A random order of the jobs as priorities (the same for the same seed and jobs)."""
    names = sorted(j.name for j in jobs)
    random.Random(seed).shuffle(names)
    return {n: len(names) - i for i, n in enumerate(names)}


def wall_seconds(jobs: Iterable, gpus: int, priority: Mapping[str, float] | None = None) -> float:
    """Seconds from the first job's start to the last one's end on `gpus` cards: a list schedule
    that, whenever cards free up, starts the ready jobs (the jobs they wait for, `job.after`, done)
    that fit the free cards, highest `priority` (by name; default `chains`: the longest chain to
    the end first) first, longer job first among equal priorities; a job of k cards takes k free
    cards. A job asking more cards than there are takes them all, as Snakemake then gives it
    (whether its model fits them is not checked here)."""
    if gpus < 1:
        raise ValueError(f"{gpus} GPUs: expected at least 1")
    jobs = list(jobs)
    after = _after(jobs)
    if priority is None:
        priority = chains(jobs)

    def take(j) -> int:
        return min(cards(j), gpus)

    waiting = sorted(jobs, key=lambda j: (-priority.get(j.name, 0), -j.seconds, j.name))
    running: list[tuple[float, int, object]] = []
    done: set[str] = set()
    free, now, n = gpus, 0.0, 0
    while waiting or running:
        for j in list(waiting):
            if take(j) <= free and after[j.name] <= done:
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


def random_walls(jobs: Iterable, gpus: int, orders: int = 20, seed: int = 0) -> list[float]:
    """`wall_seconds` of the jobs started in `orders` random orders (seeds seed .. seed + orders - 1):
    the range a run without priorities may take."""
    jobs = list(jobs)
    return [wall_seconds(jobs, gpus, random_priorities(jobs, s)) for s in range(seed, seed + orders)]
