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

`critical_path` is the chain of jobs that sets a schedule's wall time; `choose_cards` picks how
many cards each training run that divides over cards takes (iisan.pipeline.budget.Budget.choice)
by scheduling the jobs with each choice it tries.
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


def schedule(jobs: Iterable, gpus: int, priority: Mapping[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """(start, end) seconds of each job (by name) on `gpus` cards: a list schedule that, whenever
    cards free up, starts the ready jobs (the jobs they wait for, `job.after`, done) that fit the
    free cards, highest `priority` (by name; default `chains`: the longest chain to the end first)
    first, longer job first among equal priorities; a job of k cards takes k free cards. A job
    asking more cards than there are takes them all, as Snakemake then gives it (whether its
    model fits them is not checked here)."""
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
    out: dict[str, tuple[float, float]] = {}
    free, now, n = gpus, 0.0, 0
    while waiting or running:
        for j in list(waiting):
            if take(j) <= free and after[j.name] <= done:
                waiting.remove(j)
                free -= take(j)
                heapq.heappush(running, (now + j.seconds, n, j))
                out[j.name] = (now, now + j.seconds)
                n += 1
        if not running:
            raise ValueError(f"{len(waiting)} jobs wait for each other: {', '.join(j.name for j in waiting[:3])}")
        now, _, j = heapq.heappop(running)
        free += take(j)
        done.add(j.name)
    return out


def wall_seconds(jobs: Iterable, gpus: int, priority: Mapping[str, float] | None = None) -> float:
    """Seconds from the first job's start to the last one's end on `gpus` cards (`schedule`)."""
    return max((end for _, end in schedule(jobs, gpus, priority).values()), default=0.0)


def critical_path(jobs: Iterable, gpus: int, priority: Mapping[str, float] | None = None) -> list:
    """The chain of jobs that sets the wall time of `schedule`, first to last: the job that ends
    last, and before each job the one whose end let it start (a job it waits for, else the job
    that freed its cards), back to a job that started at once."""
    jobs = list(jobs)
    times = schedule(jobs, gpus, priority)
    if not times:
        return []
    by_name = {j.name: j for j in jobs}
    after = _after(jobs)
    job = max(jobs, key=lambda j: (times[j.name][1], j.seconds))
    path = [job]
    while (start := times[job.name][0]) > 0:
        ended = [j for j in jobs if times[j.name][1] == start]
        waited = [by_name[n] for n in after[job.name] if times[n][1] == start]
        job = max(waited or ended, key=lambda j: (j.seconds, j.name))
        path.append(job)
    return path[::-1]


# wall times closer than this share of them count as equal when cards are chosen (`choose_cards`):
# within the estimates' own spread (a step varies by about 5 % between processes)
SAME_WALL = 0.01


def choose_cards(jobs: Iterable, gpus: int, options: Mapping[str, Mapping[int, object]], same: float = SAME_WALL) -> dict[str, int]:
    """The cards each job of `options` (by name: per number of cards, the job on them; those of
    more cards than `gpus` left out) takes so that the `jobs` end soonest on `gpus` cards
    (`wall_seconds`, longest chain first), with the fewest card-hours among wall times within a
    share `same` of the shortest. Each job starts on its fewest cards and keeps them unless more
    make it faster by more than that share. Among the jobs that more cards make faster: a threshold,
    each of their durations tried, every such job longer than it on the fewest cards that bring
    it under it (its fastest where none does); then, while it shortens the wall time, one job on
    the `critical_path` on more cards; then, job by job (the most card-hours first), fewer cards
    wherever the wall time stays within that share of what it was."""
    jobs = {j.name: j for j in jobs}
    opts = {n: {k: o[k] for k in sorted(o) if k <= gpus} for n, o in options.items() if n in jobs}
    opts = {n: o for n, o in opts.items() if o}
    least = {n: min(o) for n, o in opts.items()}
    fastest = {n: min(o, key=lambda k: (o[k].seconds, k)) for n, o in opts.items()}
    gaining = [n for n, o in opts.items() if o[fastest[n]].seconds < o[least[n]].seconds * (1 - same)]
    if not gaining:
        return least

    def placed(chosen: dict[str, int]) -> list:
        return [opts[n][chosen[n]] if n in chosen else j for n, j in jobs.items()]

    def cost(chosen: dict[str, int]) -> tuple[float, float]:
        js = placed(chosen)
        return wall_seconds(js, gpus), sum(j.seconds * min(cards(j), gpus) for j in js)

    def pick(scored: list) -> tuple:
        """The (cost, choice) of the shortest wall time, the fewest card-hours within `same` of it."""
        low = min(c[0] for c, _ in scored)
        return min(((c, t) for c, t in scored if c[0] <= low * (1 + same)), key=lambda ct: ct[0][1])

    trials = [dict(least)]
    for limit in sorted({opts[n][k].seconds for n in gaining for k in opts[n]}):
        trials.append({**least, **{n: next((k for k in opts[n] if opts[n][k].seconds <= limit), fastest[n]) for n in gaining}})
    best_cost, best = pick([(cost(t), t) for t in trials])
    for _ in range(sum(len(opts[n]) for n in gaining)):  # each round raises one job's cards: at most this many
        raised = [{**best, j.name: k} for j in critical_path(placed(best), gpus) if j.name in gaining
                  for k in opts[j.name] if k > best[j.name]]
        wins = [(c, t) for t in raised if (c := cost(t))[0] < best_cost[0] * (1 - same)]
        if not wins:
            break
        best_cost, best = pick(wins)
    wall = best_cost[0]
    for n in sorted(gaining, key=lambda n: -opts[n][best[n]].seconds * best[n]):
        for k in [k for k in opts[n] if k < best[n]]:  # the fewest cards that keep the wall time
            trial = {**best, n: k}
            if (c := cost(trial))[0] <= wall * (1 + same) and c[1] < best_cost[1]:
                best_cost, best = c, trial
                break
    return best


def random_walls(jobs: Iterable, gpus: int, orders: int = 20, seed: int = 0) -> list[float]:
    """`wall_seconds` of the jobs started in `orders` random orders (seeds seed .. seed + orders - 1):
    the range a run without priorities may take."""
    jobs = list(jobs)
    return [wall_seconds(jobs, gpus, random_priorities(jobs, s)) for s in range(seed, seed + orders)]
