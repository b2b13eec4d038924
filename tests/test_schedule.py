"""Wall time on N GPUs (`iisan plan --gpus N`, iisan.pipeline.schedule): a list schedule that starts the job
with the longest chain of GPU work after it first, and the range random orders give."""

from dataclasses import dataclass

import pytest

from iisan.pipeline.schedule import chains, choose_cards, critical_path, random_walls, wall_seconds

H = 3600.0


@dataclass
class J:
    name: str
    seconds: float
    gpus: int = 1
    after: frozenset = frozenset()


def jobs(*specs) -> list[J]:
    """J(name, hours, gpus, after names) from (name, hours[, gpus[, after]])."""
    out = []
    for name, hours, *rest in specs:
        gpus = rest[0] if rest else 1
        after = frozenset(rest[1]) if len(rest) > 1 else frozenset()
        out.append(J(name, hours * H, gpus, after))
    return out


def test_chains_add_the_longest_chain_of_the_jobs_that_wait():
    """A job's chain is its own time plus the longest chain among the jobs waiting for it: an
    upstream job's includes its downstream work, a job nothing waits for is its own."""
    js = jobs(("a", 1), ("b", 2, 1, "a"), ("c", 3, 1, "b"), ("d", 4, 1, "a"), ("e", 0.5))
    c = chains(js)
    assert c == {"a": 6 * H, "b": 5 * H, "c": 3 * H, "d": 4 * H, "e": 0.5 * H}
    # a job waiting for one not among the jobs waits for nothing
    assert chains(jobs(("x", 1, 1, ["gone"]))) == {"x": H}


def test_longest_chain_first_beats_longest_job_first_and_random_orders():
    """Two cards; a short job (1 h) that a 10 h job waits for, two 5 h jobs. Longest job first starts
    the two 5 h jobs and the chain after them (16 h); longest chain first starts the short job at
    once and ends with the chain (11 h, the least any order can); random orders give 11-16 h."""
    js = jobs(("short", 1), ("long", 10, 1, ["short"]), ("five-a", 5), ("five-b", 5))
    assert wall_seconds(js, 2) == 11 * H  # default: chains(jobs), the critical path first
    assert wall_seconds(js, 2, {j.name: j.seconds for j in js}) == 16 * H  # longest job first
    walls = random_walls(js, 2, orders=20, seed=0)
    assert walls == random_walls(js, 2, orders=20, seed=0)  # seeded: the same range each time
    assert (min(walls), max(walls)) == (11 * H, 16 * H)


def test_several_card_jobs_and_more_cards_than_there_are():
    """A 2-card job takes two free cards (the 1-card jobs of higher priority go first and it waits
    for both); a job asking more cards than there are takes them all."""
    js = jobs(("pair", 2, 2), ("one", 3), ("two", 3))
    assert wall_seconds(js, 2) == 5 * H  # one and two (chain 3 h) first, the pair after them
    assert wall_seconds(js, 2, {"pair": 9}) == 5 * H  # the pair first, then one and two side by side
    assert wall_seconds(jobs(("big", 2, 4)), 2) == 2 * H
    assert wall_seconds(jobs(("none", 2, 0), ("one", 1)), 1) == 2 * H  # a job of no card runs beside


def test_jobs_waiting_for_each_other_are_an_error():
    js = jobs(("a", 1, 1, ["b"]), ("b", 1, 1, ["a"]))
    with pytest.raises(ValueError, match="wait for each other"):
        chains(js)
    with pytest.raises(ValueError, match="wait for each other"):
        wall_seconds(js, 2, {})
    with pytest.raises(ValueError, match="at least 1"):
        wall_seconds(js, 0)


def test_the_critical_path_is_the_chain_that_sets_the_wall_time():
    """Longest chain first on two cards, the short job and the 10 h job after it end last (11 h);
    longest job first, the short job waits for a card a 5 h job frees, then the 10 h job for it."""
    js = jobs(("short", 1), ("long", 10, 1, ["short"]), ("five-a", 5), ("five-b", 5))
    assert [j.name for j in critical_path(js, 2)] == ["short", "long"]
    path = [j.name for j in critical_path(js, 2, {j.name: j.seconds for j in js})]
    assert path[0] in ("five-a", "five-b") and path[1:] == ["short", "long"]
    assert critical_path([], 2) == []


def choice(js: list, gpus: int, spread: dict) -> dict:
    """choose_cards of `js` with these jobs' options (name: {cards: hours})."""
    opts = {}
    for name, hours in spread.items():
        job = next(j for j in js if j.name == name)
        opts[name] = {k: J(name, h * H, k, job.after) for k, h in hours.items()}
    return choose_cards(js, gpus, opts)


def test_cards_are_chosen_for_the_shortest_wall_time_fewest_card_hours_among_equal_ones():
    """An 8 h run the kernels bound (4.1 h on two cards, 2.2 on four, 1.3 on eight) beside four 1 h
    jobs on 8 cards: four cards (2.2 h, the short jobs beside it), not eight (the short ones after
    it: 2.3 h). A run no number of cards makes faster (the host bounds it) keeps one. A run that
    ends before a longer job of one card anyway keeps one (the same wall time, fewer card-hours).
    Two equal runs side by side both take more cards (neither alone shortens the wall time). A
    run that fits no single card starts from the fewest it fits; cards beyond the node's are not
    taken."""
    gpu_bound = {1: 8, 2: 4.1, 4: 2.2, 8: 1.3}
    js = jobs(("run", 8), *((f"short{i}", 1) for i in range(4)))
    assert choice(js, 8, {"run": gpu_bound}) == {"run": 4}
    assert wall_seconds([J("run", 2.2 * H, 4), *js[1:]], 8) == 2.2 * H
    assert choice(js, 4, {"run": gpu_bound}) == {"run": 4}  # 4 cards: 2.2 h + 1 h after it beats 4.1 h beside them
    assert choice(js, 8, {"run": {1: 8, 2: 8.1, 4: 8.2}}) == {"run": 1}
    longer = jobs(("run", 4), ("five", 5))
    assert choice(longer, 8, {"run": {1: 4, 2: 2.1, 4: 1.2}}) == {"run": 1}
    pair = jobs(("a", 8), ("b", 8), ("c", 1))
    assert choice(pair, 4, {"a": {1: 8, 2: 4.1}, "b": {1: 8, 2: 4.1}}) == {"a": 2, "b": 2}
    assert choice(jobs(("big", 8)), 8, {"big": {2: 4.1, 4: 2.2, 8: 2.19}}) == {"big": 4}  # 8 cards: not 1 % faster
    assert choice(jobs(("big", 8)), 2, {"big": {2: 4.1, 4: 2.2, 8: 1.3}}) == {"big": 2}
