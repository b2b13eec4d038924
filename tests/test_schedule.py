"""Wall time on N GPUs (`iisan plan --gpus N`, iisan.pipeline.schedule): a list schedule that starts the job
with the longest chain of GPU work after it first, and the range random orders give."""

from dataclasses import dataclass

import pytest

from iisan.pipeline.schedule import chains, random_walls, wall_seconds

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
