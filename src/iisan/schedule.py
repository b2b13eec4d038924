"""Wall time of a config's GPU jobs on one machine with N cards (`iisan plan --gpus N`).

A list schedule, as a local run with `--resources gpu=N` runs them, each job on cards of its own
(iisan.gpus): whenever cards free up, the longest job whose inputs are done and that fits the free
cards starts. A job takes the cards its rule asks for (iisan.budget.Job.gpus: a 34B captioner
two 80 GB cards, a stand-in captioner none) and waits for the GPU jobs upstream of it in
Snakemake's DAG (Job.after, from iisan.graph). Durations are the budget's (upper bounds: every
run to max_epochs); CPU jobs (preprocessing, pruning, tables) are left out.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


def cards(job) -> int:
    """GPUs a job takes at once (1 unless it says)."""
    return int(getattr(job, "gpus", 1))


def wall_seconds(jobs: Iterable, gpus: int) -> float:
    """Seconds from the first job's start to the last one's end on `gpus` cards: a list schedule,
    longest ready job first, a job of k cards on k free cards, once the jobs it waits for
    (`job.after`, by name; those not among `jobs` left out) are done. A job asking more cards
    than there are takes them all, as Snakemake then gives it (whether its model fits them is
    not checked here)."""
    if gpus < 1:
        raise ValueError(f"{gpus} GPUs: expected at least 1")
    jobs = list(jobs)
    names = {j.name for j in jobs}
    after = {j.name: set(getattr(j, "after", ())) & names for j in jobs}

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
