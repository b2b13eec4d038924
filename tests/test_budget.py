"""GPU-hour budget (`iisan plan`): every GPU job of Snakemake's DAG, priced from the rates file;
the GPU rules request the same estimates."""

import csv
import re
import subprocess
import sys

import pytest
import yaml

from iisan import tables
from iisan.captions import shards
from iisan.pipeline import plan
from iisan.pipeline.budget import RATES, Budget, load_rates, weight_gb

from conftest import ROOT, workflow_config


def paper():
    return workflow_config(ROOT, "config/paper.yaml")


def run(dataset, row, seed=12345) -> dict:
    """The train rule's wildcards of a planned row."""
    return {**plan.run_wildcards(dataset, row), "seed": seed}


def test_budget_has_every_gpu_job_the_targets_need(paper_graph):
    """The DAG's training runs and profiles are exactly the registry's plan; caches exactly the
    full caches those runs (and Fig. 6) read; captions for the caption fields of Table IX."""
    cfg = paper_graph.config
    budget = Budget(cfg).build(paper_graph)
    kinds = {k: {j.name for j in budget.jobs.values() if j.kind == k} for k in ("train", "profile", "cache", "caption")}
    figures = {"fig4": "table4", "fig7": "fig7"}
    runs = {p for k in cfg["tables"] + [figures[f] for f in cfg["figures"] if f in figures] for _, p in tables.plan_runs(k, cfg)}
    assert kinds["train"] == runs
    assert kinds["profile"] == {p for _, p in tables.efficiency_plan(cfg)}
    caches = set()
    for k in cfg["tables"] + ["fig7"]:
        for dataset in tables.table_datasets(cfg, k):
            for row in tables.table_plan(k, cfg):
                w = plan.run_wildcards(dataset, row)
                if w["cache"] != "none":
                    caches |= {plan.CACHE_ARRAY.format(dataset=dataset, field=t.field, backbone=t.backbone)
                               for t in plan.parse_towers(cfg, w["towers"])}
    caches |= {plan.array(c) for c in tables.fig6_caches(cfg) if "pruned-" not in c}
    assert kinds["cache"] == caches
    assert kinds["caption"] == {o for s in ("cover", "video") for o in shards.caption_outputs(cfg, "MicroLens", s)}  # a job per shard
    total = budget.summary()[-1]
    assert total["group"] == "total" and total["jobs"] == len(budget.jobs)
    assert total["gpu_hours"] <= sum(r["gpu_hours"] for r in budget.summary()[:-1])  # shared jobs once


def test_budget_scales_with_the_rates_and_the_config():
    """A run is priced at max_epochs from the measured step time: twice the step time or twice the
    epochs, about twice the hours; FFT (every weight trains) needs more memory than BitFit."""
    cfg = paper()
    cfg["train"]["item_slots"] = "all"  # every slot: the rate's own shape
    rates = load_rates()
    row = plan.compared_row(cfg, "fft")
    base = Budget(cfg, rates).train(run("Scientific", row))
    slow = yaml.safe_load(RATES.read_text())
    slow["in_loop"]["step_s"]["fft"] *= 2
    assert Budget(cfg, slow).train(run("Scientific", row)).seconds > 1.9 * base.seconds - 2 * rates["in_loop"]["startup_s"]
    steps = -(-12076 // 32)  # Table I users, batch 32
    assert abs(base.seconds - 100 * steps * rates["in_loop"]["step_s"]["fft"]) / base.seconds < 0.1
    cfg["method_train"]["fft"]["max_epochs"] = 50
    assert abs(Budget(cfg, rates).train(run("Scientific", row)).seconds / base.seconds - 0.5) < 0.05
    bitfit = Budget(paper(), rates).train(run("Scientific", plan.compared_row(cfg, "bitfit")))
    assert base.peak_gib > bitfit.peak_gib
    # a cached run holds its cache on the GPU: the 70B full cache needs more memory than the dropped one
    fig7 = {(r["label"], r["cache"]): r for r in tables.table_plan("fig7", cfg)}
    full, dropped = (Budget(cfg, rates).train(run("Scientific", fig7[("llama3-70b-gptq", c)])) for c in ("full", "dropped"))
    assert full.peak_gib > dropped.peak_gib + 15


def test_real_item_slots_are_priced_by_the_share_of_slots_holding_an_item():
    """train.item_slots real (config/paper.yaml): the backbones see the slots that hold an item
    (Table I: 81,711 interactions of 12,076 Scientific users, two held out each, over 11 slots), so
    a step costs the rows' fixed share plus the rest times that share and the activations shrink
    with the rows; Fig. 5's profiles keep every slot (efficiency.item_slots)."""
    from iisan.pipeline.budget import slot_share

    rates = load_rates()
    cfg = paper()
    share = slot_share(cfg, "Scientific", 11)
    assert share == pytest.approx((81_711 / 12_076 - 2) / 11) and 0.43 < share < 0.44
    row = plan.compared_row(cfg, "fft")
    assert cfg["train"]["item_slots"] == "real"
    w = plan.run_wildcards("Scientific", row)
    assert plan.experiment(cfg, *w.values(), 12345).train.item_slots == "real"
    assert plan.profile_experiment(cfg, *w.values()).train.item_slots == "all"
    profile = {**w, "batch": 32}
    real, real_profile = Budget(cfg, rates).train(run("Scientific", row)), Budget(cfg, rates).train(profile)
    cfg["train"]["item_slots"] = "all"
    every, every_profile = Budget(cfg, rates).train(run("Scientific", row)), Budget(cfg, rates).train(profile)
    fixed = rates["in_loop"]["rows_fixed_share"]
    steps = -(-12076 // 32)
    saved = 100 * steps * rates["in_loop"]["step_s"]["fft"] * (1 - fixed) * (1 - share)
    assert every.seconds - real.seconds == pytest.approx(saved)
    assert real.peak_gib < every.peak_gib
    assert (real_profile.seconds, real_profile.peak_gib) == (every_profile.seconds, every_profile.peak_gib)


def test_captions_are_priced_at_the_rate_of_their_kv_cache():
    """captions.kv_cache: static prices the captions at the static cache's measured rate (per item,
    scaled by the captioner's parameters), with `attention: sdpa_gqa` at that option's, dynamic at
    the dynamic cache's; the peak stays."""
    rates = load_rates()
    cfg = paper()
    video = {"dataset": "MicroLens", "source": "video"}
    r = rates["captions"]
    seconds = {}
    for kv, attention in (("dynamic", "sdpa"), ("static", "sdpa"), ("static", "sdpa_gqa")):
        cfg["captions"].update(kv_cache=kv, attention=attention)
        seconds[kv, attention] = Budget(cfg, rates).caption(video).seconds
    assert seconds["static", "sdpa"] / seconds["dynamic", "sdpa"] == pytest.approx(r["static"]["video_item_s"] / r["video_item_s"])
    assert seconds["static", "sdpa_gqa"] / seconds["dynamic", "sdpa"] == pytest.approx(r["static_sdpa_gqa"]["video_item_s"] / r["video_item_s"])


def test_weight_size_of_quantised_and_demo_backbones():
    cfg = paper()
    assert weight_gb(cfg["backbones"]["bert-base"]) == 0.11 * 4
    assert weight_gb(cfg["backbones"]["llama3-70b-gptq"]) == 70.6 * 0.55
    demo = workflow_config()["backbones"]["bert-demo"]  # a stand-in: its own size (12 L d^2), not the real model's
    assert demo["source"] == "demo"
    assert weight_gb(demo) == 12 * demo["layers"] * demo["hidden"] ** 2 / 1e9 * 4


def test_dataset_size_from_stats_table_i_or_demo_spec(tmp_path, monkeypatch):
    from iisan.pipeline.budget import dataset_size

    demo = workflow_config()
    spec = demo["dataset_sources"]["demo"]["demo"]
    monkeypatch.chdir(tmp_path)
    assert dataset_size(demo, "demo") == (spec["n_users"], spec["n_items"])
    assert dataset_size(demo, "Scientific") == (12076, 20314)
    (tmp_path / "resources/demo").mkdir(parents=True)
    (tmp_path / "resources/demo/stats.json").write_text('{"users": 7, "items": 9}')
    assert dataset_size(demo, "demo") == (7, 9)
    demo["dataset_sources"]["mine"] = {"kind": "amazon"}
    with pytest.raises(ValueError, match="resources/mine/stats.json"):
        dataset_size(demo, "mine")


@pytest.mark.slow
def test_iisan_plan_command(tmp_path):
    """`iisan plan` prints a row per table and figure and the total (GPU hours and card-hours),
    where the rates come from, the disk with the videos, the wall time on 8 GPUs longest chain
    first and in random orders, the cards each run takes and why, the critical path, and writes
    every job."""
    jobs = tmp_path / "jobs.csv"
    out = subprocess.run([sys.executable, "-m", "iisan.cli", "plan", "--configfile", "config/paper.yaml", "--jobs", str(jobs),
                          "--gpus", "8"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in ("table3", "table4", "table5", "table9", "fig5", "fig7", "total"):
        assert any(line.startswith(name) for line in lines), name
    assert "card-hours" in lines[1]
    for said in ("measured on NVIDIA H200", "measured on NVIDIA H100", "extrapolated", "not measured", "scaled", "MicroLens: 19,738 videos"):
        assert said in out.stdout, said
    assert re.search(r"wall time on 8 GPUs: [\d.]+ h \(GPU hours [\d.]+\) longest chain first, [\d.]+–[\d.]+ h in random orders", out.stdout)
    # config/paper.yaml's nodes have 8 cards, but its in-loop steps are bound by the host: every run on one
    assert "every run takes one card: the in-loop steps are bound by the host: 0.10 s a step whatever k" in out.stdout
    assert re.search(r"critical path \(the chain of jobs that sets the wall time[^)]*\): results/runs/MicroLens/\S+/fft/\S+ \([\d.]+ h, 1 card\)",
                     out.stdout)
    rows = list(csv.DictReader(jobs.open()))
    total = next(line for line in lines if line.startswith("total")).split()
    assert len(rows) == int(total[1])
    assert sum(float(r["card_hours"]) for r in rows) == pytest.approx(float(total[7]), abs=0.1)
    assert {r["kind"] for r in rows} == {"caption", "cache", "train", "profile"}
    bad = subprocess.run([sys.executable, "-m", "iisan.cli", "plan", "--config", "tables=[table42]"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "table42" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_plan_and_snakemake_agree_on_the_jobs_of_the_paper(paper_graph):
    """`iisan plan` prices exactly the GPU jobs `snakemake -n` lists for config/paper.yaml."""
    budget = Budget(paper_graph.config).build(paper_graph)
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--configfile", "config/paper.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = {}
    for line in (out.stdout + out.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    for kind in ("caption", "cache", "train", "profile"):
        assert counts.get(kind, 0) == sum(j.kind == kind for j in budget.jobs.values()), kind


def test_gpu_rules_request_their_estimates(demo_graph):
    """A GPU job's runtime is its estimate times cluster.runtime_margin, at most
    cluster.max_runtime_min; its cards hold its estimated peak on cards of cluster.gpu_gib; a run
    whose peak fits no card stops before it starts, naming the setting."""
    import math

    from snakemake.exceptions import WorkflowError

    from iisan.pipeline.graph import job_graph

    budget = Budget(demo_graph.config).build(demo_graph)
    assert budget.cards(100.0) == 2 and budget.cards(70.0) == 1 and budget.cards(0.1) == 1
    assert Budget({**demo_graph.config, "cluster": {"gpu_gib": 141}}).cards(100.0) == 1
    train = next(n for n in demo_graph.nodes if n.rule == "train")
    job = budget.jobs[train.name]
    assert job is budget.estimate("train", dict(train.wildcards)) and train.resources["gpu"] == 0  # no CUDA here

    def node(**cluster):
        overrides = {"gpus_per_job": "1", "cluster": str(cluster)}
        return next(n for n in job_graph(ROOT, [], overrides, [train.name]).nodes if n.rule == "train")

    long = node(runtime_margin=1000)
    assert long.resources["runtime"] == max(10, math.ceil(job.seconds * 1000 / 60)) > 10
    assert long.resources["gpu"] == 1
    assert node(runtime_margin=1000, max_runtime_min=10).resources["runtime"] == 10
    with pytest.raises(WorkflowError, match="cluster.gpu_gib = 0.1 GiB"):
        node(gpu_gib=0.1)


def test_planning_imports_no_torch():
    """Building the job graph (the Snakefile, its checks, every input and resource function) and
    pricing it never imports torch or transformers: a dry run on a submit host stays light."""
    code = ("import sys; from iisan.pipeline.graph import job_graph; from iisan.pipeline.budget import Budget; g = job_graph(sys.argv[1]); "
            "Budget(g.config).build(g); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_no_gpu_job_of_the_paper_asks_for_less_than_its_estimate():
    """On a GPU cluster (gpus_per_job 1) every GPU job of config/paper.yaml requests at least its
    estimated runtime (or the partition's limit, cluster.max_runtime_min, where it is longer: it
    resumes on its next attempt) and the cards its estimated peak needs; captions plan as several jobs."""
    from iisan.pipeline.budget import GPU_RULES, usable_gib
    from iisan.pipeline.graph import job_graph

    graph = job_graph(ROOT, ["config/paper.yaml"], {"gpus_per_job": "1"}, resources={"gpu": 8})  # 8 cards a node
    budget = Budget(graph.config).build(graph)
    nodes = [n for n in graph.nodes if n.rule in GPU_RULES]
    assert len(nodes) == len(budget.jobs) and sum(n.rule == "caption" for n in nodes) > 2
    for n in nodes:
        job = budget.jobs[n.name]
        limit = graph.config["cluster"]["max_runtime_min"]
        assert n.resources["runtime"] * 60 >= min(job.seconds, limit * 60 if limit else job.seconds), n.name
        assert n.resources["gpu"] >= job.gpus and job.peak_gib <= n.resources["gpu"] * usable_gib(graph.config), n.name


def video_shard(shard=1, shards=12) -> dict:
    return {"dataset": "MicroLens", "source": "video", "shard": str(shard), "shards": str(shards)}


def test_card_hours_count_a_job_once_per_card(tmp_path, monkeypatch):
    """A 34B caption shard holds two 80 GB cards: its card-hours are twice its GPU hours, per table
    and in total, and in the --jobs CSV; a one-card job's are its GPU hours."""
    from iisan.pipeline.budget import write_jobs

    monkeypatch.chdir(tmp_path)  # Table I sizes
    cfg = paper()
    budget = Budget(cfg)
    video = budget.estimate("caption", video_shard())
    run_ = budget.estimate("train", run("Scientific", plan.compared_row(cfg, "fft")))
    assert (video.gpus, run_.gpus) == (2, 1)
    video.groups, run_.groups = ("table9",), ("table3",)
    budget.jobs = {j.name: j for j in (video, run_)}
    rows = {r["group"]: r for r in budget.summary()}
    assert rows["table9"]["card_hours"] == pytest.approx(2 * rows["table9"]["gpu_hours"])
    assert rows["table3"]["card_hours"] == pytest.approx(rows["table3"]["gpu_hours"])
    assert rows["total"]["card_hours"] == pytest.approx((2 * video.seconds + run_.seconds) / 3600)
    write_jobs(budget, tmp_path / "jobs.csv")
    got = {r["output"]: r for r in csv.DictReader((tmp_path / "jobs.csv").open())}
    assert float(got[video.name]["card_hours"]) == pytest.approx(2 * float(got[video.name]["gpu_hours"]), abs=1e-4)
    assert got[video.name]["gpus"] == "2"


def test_videos_are_in_the_disk_report_per_dataset(tmp_path, monkeypatch):
    """The fetched MicroLens videos the video captions need: the dataset's items (Table I: 19,738)
    at the assumed 20-50 MB each, said so; none without video captions or for a generated twin."""
    from iisan.pipeline.budget import VIDEO_MB, render_videos

    monkeypatch.chdir(tmp_path)
    budget = Budget(paper())
    cover = budget.estimate("caption", {**video_shard(), "source": "cover"})
    budget.jobs = {cover.name: cover}
    assert budget.videos() == [] and render_videos(budget) == ""
    video = budget.estimate("caption", video_shard())
    budget.jobs[video.name] = video
    (row,) = budget.videos()
    assert (row["dataset"], row["items"]) == ("MicroLens", 19_738)
    assert row["gb"] == pytest.approx((19_738 * VIDEO_MB[0] / 1e3, 19_738 * VIDEO_MB[1] / 1e3))
    text = render_videos(budget)
    assert "MicroLens: 19,738 videos, 395-987 GB" in text and "assumed" in text
    budget.config["dataset_sources"]["MicroLens"] = {"kind": "microlens-demo"}  # generated videos: not fetched
    assert budget.videos() == []


def test_every_rate_section_says_where_its_rates_come_from(paper_graph):
    """Every section of rates.yaml that holds rates has a provenance (device, how, source), and so
    has each rate any of the paper's jobs is priced from; measured and extrapolated rates name
    their device. The facts recorded: the in-loop validation and fixed row share on an H100, the
    sdpa_gqa caption rates extrapolated from 100 tokens on an H100, start-ups and disk load set by
    hand; the 34B captioner is scaled from the 7.6B's rate."""
    from iisan.pipeline.budget import HOW, NOT_RATES, provenance

    rates = load_rates()
    sections = [k for k, v in rates.items() if isinstance(v, dict) and k not in NOT_RATES]
    assert {"cached", "in_loop", "caching", "captions"} <= set(sections)
    for name in sections:
        record = rates[name].get("provenance")
        assert record, f"rates.yaml section {name!r}: no provenance"
        for key, r in [(name, record), *((f"{name}.{k}", v) for k, v in (record.get("rates") or {}).items())]:
            assert r["how"] in HOW and r.get("source"), key
            assert (r.get("device") is None) == (r["how"] == "not measured"), key
            if key != name:  # a per-rate record names a rate or sub-section of its section
                section = rates[name]
                for part in key.split(".")[1:]:
                    assert part in section, f"rates.yaml {key}: provenance of a rate that is not there"
                    section = section[part]
    budget = Budget(paper_graph.config).build(paper_graph)
    used = {k for j in budget.jobs.values() for k in j.rates}
    assert used and all(provenance(rates, k)["how"] in HOW for k in used)
    assert provenance(rates, "in_loop.eval_s")["device"].startswith("NVIDIA H100")
    assert provenance(rates, "in_loop.step_s.fft")["device"] == "NVIDIA H200"
    gqa = provenance(rates, "captions.static_sdpa_gqa.video_item_s")
    assert gqa["how"] == "extrapolated" and gqa["device"].startswith("NVIDIA H100")
    assert provenance(rates, "in_loop.startup_s")["how"] == "not measured"
    assert {"in_loop.startup_s", "caching.load_gb_per_s", "captions.static_sdpa_gqa.video_item_s"} <= used
    scaled = {j.name for j in budget.jobs.values() if j.scaled}
    assert scaled == {j.name for j in budget.jobs.values() if j.kind == "caption" and j.wildcards["source"] == "video"}
    assert provenance({"device": "mine"}, "cached.eval_s")["how"] == "not recorded"  # an older rates file


def test_priority_is_the_longest_chain_of_gpu_work_to_the_end(paper_graph, demo_graph):
    """A GPU job's priority is the whole minutes of its own estimate plus the longest chain of the
    GPU jobs waiting for it. Worked out from the config alone (what a rule's `priority:` can call
    while Snakemake builds the DAG), the jobs and what each waits for are exactly those of
    Snakemake's DAG, so the priorities are the DAG's longest chains."""
    import math

    from iisan.pipeline.schedule import chains

    for graph in (paper_graph, demo_graph):
        budget = Budget(graph.config).build(graph)
        from_config = Budget(graph.config).config_jobs()
        assert {n: j.after for n, j in from_config.items()} == {n: j.after for n, j in budget.jobs.items()}
        chain = chains(budget.jobs.values())
        for job in budget.jobs.values():
            assert job.priority == math.ceil(chain[job.name] / 60), job.name
    # an upstream job's priority counts its downstream chain: a video caption shard, then the FFT
    # run on the video captions with its backbones in the loop (and the cache of those captions)
    budget = Budget(paper_graph.config).build(paper_graph)
    chain = chains(budget.jobs.values())
    shard = budget.jobs[plan.CAPTION_SHARD.format(**video_shard())]
    waiting = [j for j in budget.jobs.values() if shard.name in j.after]
    assert {j.kind for j in waiting} == {"cache", "train"}
    assert shard.priority == math.ceil((shard.seconds + max(chain[j.name] for j in waiting)) / 60)
    assert shard.priority > math.ceil(shard.seconds / 60) + 60  # the FFT run's hour and more
    assert Budget(paper_graph.config).priority("caption", video_shard()) == shard.priority  # without the DAG


def test_budget_does_not_depend_on_the_planning_machines_gpus(monkeypatch):
    """The cards, hours, peaks and priorities of the paper's jobs are the same whether the host
    that plans has no GPU or one: a job's cards are its peak over cluster.gpu_gib (two for the
    34B captioner), never the host's."""
    from iisan.pipeline.graph import job_graph

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = []
    for count in ("0", "1"):
        monkeypatch.setenv("IISAN_GPUS", count)
        graph = job_graph(ROOT, ["config/paper.yaml"])
        budget = Budget(graph.config).build(graph)
        seen.append({n: (j.gpus, j.seconds, j.peak_gib, j.priority) for n, j in budget.jobs.items()})
    assert seen[0] == seen[1]
    assert seen[0][plan.CAPTION_SHARD.format(**video_shard())][0] == 2


@pytest.mark.slow
def test_a_card_limit_below_a_jobs_need_stops_the_run_naming_both(tmp_path):
    """The 34B captioner needs two 80 GB cards: with `--resources gpu=1` the run stops before any
    job starts, naming both numbers, instead of giving the job one card; a dry run without a limit
    shows the two cards a cluster job will ask for, whatever GPUs this host has."""
    from conftest import SNAKEMAKE, copy_workflow, run

    wd = copy_workflow(ROOT, tmp_path)
    shard = "resources/MicroLens/captions/video.shards/1-of-12.parquet"
    base = SNAKEMAKE + ["-n", "--configfile", "config/paper.yaml", "--config", "gpus_per_job=1"]
    capped = run(base + ["--resources", "gpu=1", "--", shard], wd)
    out = capped.stdout + capped.stderr
    assert capped.returncode != 0 and re.search(r"needs 2 GPUs of 80 GiB .*but this run may use 1 \(--resources gpu=1", out), out[-3000:]
    free = run(base + ["--", shard], wd)
    out = free.stdout + free.stderr
    assert free.returncode == 0, out[-3000:]
    block = out[out.index("rule caption:"):]
    assert re.search(r"resources: .*\bgpu=2\b", block.split("\n\n")[0]), block[:2000]
