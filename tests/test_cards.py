"""Training runs spread over k cards of one node (iisan.pipeline.budget.Split, Budget.choice): a
step on k cards is max(host, kernels / k) + the gradients' all-reduce; the cards of each run are
chosen once per config so that the jobs end soonest on the node's cards, and `iisan plan` and the
train rule's `gpu` resource ask the same k."""

import pytest

from iisan.pipeline import plan
from iisan.pipeline.budget import Budget, Split, load_rates
from iisan.pipeline.schedule import chains, critical_path, wall_seconds

from conftest import ROOT, workflow_config

H = 3600.0


def paper(**cluster) -> dict:
    cfg = workflow_config(ROOT, "config/paper.yaml")
    cfg["cluster"].update(cluster)
    return cfg


def toy(node_gpus: int) -> dict:
    """Table V alone, FFT at batch 96: the MicroLens FFT run is the longest job by far (8.5 h of
    9), its step bound by the kernels (about twice its host's time), not by the host."""
    cfg = paper(node_gpus=node_gpus)
    cfg.update(tables=["table5"], figures=[])
    cfg["method_train"]["fft"]["batch_size"] = 96
    return cfg


MICROLENS_FFT = "results/runs/MicroLens/title@bert-base+image@vit-base/fft/last/none/seed12345/metrics.json"
TOY = {"gpus_per_job": "1", "tables": ["table5"], "figures": [], "method_train": {"fft": {"batch_size": 96}}}  # toy() as --config


def fft(cfg: dict, dataset="Scientific") -> dict:
    """The train rule's wildcards of a dataset's FFT run (Table III's row)."""
    return {**plan.run_wildcards(dataset, plan.compared_row(cfg, "fft")), "seed": 12345}


@pytest.fixture(autouse=True)
def table_i(tmp_path, monkeypatch):
    """Dataset sizes from Table I (no preprocessed stats.json of a run in the working tree)."""
    monkeypatch.chdir(tmp_path)


def test_a_step_on_k_cards_is_the_host_or_the_kernels_over_k_plus_the_all_reduce():
    """A host-bound step (0.10 s of host work, 0.064 s of kernels) gains nothing from more cards:
    every process launches the same kernels, and the all-reduce adds to it. A kernel-bound step
    (0.05 s host, 0.4 s kernels) on two cards takes half its kernels plus the all-reduce of
    680 MB of fp32 gradients over a 300 GB/s bus (2(k-1)/k of them: 2.3 ms), so it is faster by
    a little less than 2; on 8 cards the host bounds it. The validation passes divide. Memory:
    the state whole on each card (with DDP's gradient buckets), the activations divided."""
    host_bound = Split(1000, host_s=0.10, gpu_s=0.064, grad_bytes=680e6, bus_gb_per_s=300, fixed_s=60,
                       state_gib=2.5, act_gib=20)
    for k in (2, 4, 8):
        assert host_bound.step_s(k) > host_bound.step_s(1) == 0.10
        assert host_bound.seconds(k) > host_bound.seconds(1) == 60 + 1000 * 0.10
    gpu_bound = Split(1000, host_s=0.05, gpu_s=0.4, grad_bytes=680e6, bus_gb_per_s=300, fixed_s=60, state_gib=2.5, act_gib=20)
    assert gpu_bound.allreduce_s(1) == 0 and gpu_bound.allreduce_s(2) == pytest.approx(680e6 / 300e9)
    assert gpu_bound.step_s(2) == pytest.approx(0.2 + 680e6 / 300e9)
    assert 1.95 < gpu_bound.step_s(1) / gpu_bound.step_s(2) < 2
    assert gpu_bound.step_s(8) == pytest.approx(0.05 + 680e6 * 2 * 7 / 8 / 300e9)  # the host bounds it
    assert gpu_bound.peak_gib(1) == 22.5
    evaluated = Split(1000, host_s=0.05, gpu_s=0.4, grad_bytes=680e6, bus_gb_per_s=300, fixed_s=60, state_gib=2.5, act_gib=20,
                      eval_s=500)
    assert evaluated.seconds(4) - gpu_bound.seconds(4) == pytest.approx(125)  # each process evaluates a quarter of the items and users
    assert gpu_bound.peak_gib(4) == pytest.approx(2.5 + 680e6 / 2**30 + 5)


def test_a_runs_host_and_kernels_come_from_the_measured_fft_step():
    """The one-card step of a run with its backbones in the loop is split in the proportions the
    measured FFT step gives (rates.yaml `cards`): with every item slot at batch 32 the kernels
    (124.6 ms) outweigh the host (101.0 ms), so the kernels are the whole step; with the slots
    holding an item (0.43 of them on Scientific) the host bounds it and the kernels are about
    64 ms of 101. Its one-card seconds are the in_loop price, unchanged; a cached run, a profile
    and an ID model do not divide; the all-reduce carries FFT's every backbone weight, LoRA's
    few."""
    c = load_rates()["cards"]
    cfg = paper()
    real = Budget(cfg).train(fft(cfg))
    assert real.split.host_s == pytest.approx(real.split.step_s(1))
    assert real.split.seconds(1) == pytest.approx(real.seconds)
    share = (81_711 / 12_076 - 2) / 11
    fixed = (c["gpu_s"]["real"] / c["gpu_s"]["all"] - c["slot_share"]) / (1 - c["slot_share"])
    assert real.split.gpu_s / real.split.host_s == pytest.approx(c["gpu_s"]["all"] * (fixed + (1 - fixed) * share) / c["host_s"])
    assert 0.6 < real.split.gpu_s / real.split.host_s < 0.66
    cfg["train"]["item_slots"] = "all"
    every = Budget(cfg).train(fft(cfg))
    assert every.split.gpu_s == pytest.approx(every.split.step_s(1))
    assert every.split.host_s / every.split.gpu_s == pytest.approx(0.1010 / 0.1246)
    towers = plan.parse_towers(cfg, fft(cfg)["towers"])
    assert real.split.grad_bytes == pytest.approx(4 * (sum(12 * t.spec["layers"] * t.spec["hidden"] ** 2 for t in towers)
                                                       + 20 * 64**2), rel=0.02)
    lora = Budget(cfg).train({**fft(cfg), "method": "lora"})
    assert lora.split is not None and lora.split.grad_bytes < real.split.grad_bytes / 100
    rows = {r["token"]: r for r in (plan.compared_row(cfg, t) for t in ("iisan", "sasrec-id"))}
    for row in rows.values():
        assert Budget(cfg).train({**plan.run_wildcards("Scientific", row), "seed": 12345}).split is None
    assert Budget(cfg).train({**plan.run_wildcards("Scientific", plan.compared_row(cfg, "fft")), "batch": 32}).split is None


def test_a_long_kernel_bound_run_is_spread_and_the_wall_time_falls():
    """Table V with FFT at batch 96 on a node of 8 cards: the MicroLens FFT run, which sets the
    wall time on one card, is spread over the fewest cards that bring it within 1 % of its fastest
    (its kernels halved on two, the host bounds it from there) and the jobs end in about half
    the time; on a node of one card every run keeps one, priced as before. A run spread over k
    cards holds k cards, each with less than the one-card peak."""
    from iisan.pipeline.schedule import SAME_WALL

    one, eight = Budget(toy(1)), Budget(toy(8))
    assert one.choice() == {}
    jobs_one, jobs_eight = one.config_jobs(), eight.config_jobs()
    assert {j.gpus for j in jobs_one.values()} == {1}
    assert all(j.seconds == one.price(j.kind, j.wildcards).seconds for j in jobs_one.values())
    assert critical_path(list(jobs_one.values()), 8)[-1].name == MICROLENS_FFT
    chosen = eight.choice()
    assert list(chosen) == [MICROLENS_FFT]
    options = eight.card_options(jobs_one[MICROLENS_FFT])
    fastest = min(j.seconds for j in options.values())
    assert chosen[MICROLENS_FFT] == min(k for k, j in options.items() if j.seconds <= fastest * (1 + SAME_WALL)) > 1
    job, alone = jobs_eight[MICROLENS_FFT], jobs_one[MICROLENS_FFT]
    assert job.gpus == chosen[MICROLENS_FFT] and job.seconds < 0.6 * alone.seconds and job.peak_gib < alone.peak_gib
    assert eight.estimate("train", job.wildcards) == job and "DDP on" in job.detail and "cards.bus_gb_per_s" in job.rates
    wall_one, wall_eight = wall_seconds(jobs_one.values(), 8), wall_seconds(jobs_eight.values(), 8)
    assert wall_eight < 0.6 * wall_one
    # the rules' priorities count the spread run's own hours
    assert eight.priority("train", job.wildcards) == -(-chains(jobs_eight.values())[MICROLENS_FFT] // 60) < alone.seconds / 60


def test_the_papers_runs_stay_on_one_card_their_steps_bound_by_the_host():
    """config/paper.yaml on its 8-card nodes: every run with its backbones in the loop is bound by
    the host (the slots holding an item), so none gets faster on more cards and each keeps one;
    the plan says so."""
    from iisan.pipeline.budget import render_cards

    budget = Budget(paper())
    assert budget.node_gpus() == 8
    assert budget.choice() == {}
    jobs = budget.config_jobs()
    divisible = [j for j in jobs.values() if j.split is not None]
    assert divisible and all(j.split.host_s >= j.split.gpu_s for j in divisible)
    budget.jobs = jobs
    assert render_cards(budget).startswith("every run takes one card: the in-loop steps are bound by the host: 0.10 s a step whatever k")


def test_a_run_that_fits_no_card_is_spread_until_it_fits():
    """Activations divide over the cards: a run whose one-card peak exceeds a card takes the
    fewest cards on which it fits (on a node of several), and stays on one (where the rule stops
    it) on a node of one."""
    cfg = toy(8)
    cfg["cluster"]["gpu_gib"] = 40  # FFT at batch 96: about 67 GiB on one card
    budget = Budget(cfg)
    alone = budget.price("train", fft(cfg, "MicroLens"))
    assert alone.peak_gib > 40 * 0.94
    fits = budget.card_options(alone)
    assert 1 not in fits and all(j.peak_gib <= 40 * 0.94 for j in fits.values())
    job = budget.config_jobs()[MICROLENS_FFT]
    assert job.gpus >= min(fits) > 1 and job.peak_gib <= 40 * 0.94
    cfg["cluster"]["node_gpus"] = 1
    assert Budget(cfg).estimate("train", fft(cfg, "MicroLens")).gpus == 1


def test_the_rule_asks_the_cards_the_plan_priced(monkeypatch):
    """The train rule's `gpu` resource (workflow/rules/common.smk get_gpus) is the k `iisan plan`
    prices, for every GPU job of the toy config's DAG on a node of 8 cards (some runs on several)
    and of 1 (every run on one)."""
    from iisan.pipeline.budget import GPU_RULES
    from iisan.pipeline.graph import job_graph

    monkeypatch.chdir(ROOT)  # dataset sizes as the workflow reads them (`iisan plan` runs there too)
    for node in (8, 1):
        graph = job_graph(ROOT, ["config/paper.yaml"], {**TOY, "cluster": {"node_gpus": node}})
        budget = Budget(graph.config).build(graph)
        asked = {n.name: n.resources["gpu"] for n in graph.nodes if n.rule in GPU_RULES}
        assert asked == {n: j.gpus for n, j in budget.jobs.items()}
        assert max(asked.values()) > 1 if node == 8 else set(asked.values()) == {1}
        spread = {n for n, k in asked.items() if k > 1}
        assert spread == set(Budget(toy(node)).choice())
