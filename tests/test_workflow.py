"""The Snakemake workflow end to end on a tiny config, in a temporary copy of the repository."""

import csv
import json
import re

import pytest

from iisan import tables
from iisan.data.amazon import preprocess
from iisan.data.demo import DemoSpec, generate
from iisan.data.sequences import load_sequences
from iisan.encoders.backbones import BackboneSpec, build_standin
from iisan.encoders.cache import build_cache, load_cache
from iisan.encoders.cache_job import CacheJob
from iisan.pipeline import plan
from iisan.training.features import CachedFeatures
from iisan.training.layerdrop import scheme_layers
from iisan.training.model import ModelConfig
from iisan.training.train import TrainConfig, Trainer, popularity_baseline, start_run

from conftest import SNAKEMAKE, copy_workflow, run, workflow_config

pytestmark = pytest.mark.slow  # Snakemake runs of the whole workflow


def test_config_overrides_on_the_command_line_are_typed(root, tmp_path):
    """`--config` values are read as YAML, like the config files (snakemake leaves them strings,
    which the schema would refuse)."""
    wd = copy_workflow(root, tmp_path)
    overrides = {"include_h0": "false", "seeds": "[1, 2]", "train": "{max_epochs: 3, lr_main: 1e-3}"}
    res = run(SNAKEMAKE + ["-n", "results/table6.csv", "--config", *(f"{k}={v}" for k, v in overrides.items())], wd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "/seed1/metrics.json" in out and "/seed2/metrics.json" in out
    config = workflow_config(root, **overrides)
    runs = tables.plan_runs("table6", config)
    # the ablations train the overridden seeds; the full models are Table III's runs, which add
    # its significance seeds (one configuration, one set of seeds)
    assert {r["seed"] for r, _ in runs if r["key"] != "iisan"} == {1, 2}
    assert {r["seed"] for r, _ in runs if r["key"] == "iisan"} == {1, 2, *config["table3"]["significance_seeds"]}
    for row, path in runs:
        w = re.match(r"results/runs/" + plan.RUN.replace("{", "(?P<").replace("}", ">[^/]+)") + r"/seed(?P<seed>\d+)/", path)
        exp = plan.experiment(config, **w.groupdict())
        assert exp.include_h0 is False and exp.train.max_epochs == 3 and exp.train.lr_main == 1e-3
        assert exp.train.batch_size == 64 and exp.train.seed == row["seed"]


def test_config_typo_stops_with_the_key_name(root, tmp_path):
    wd = copy_workflow(root, tmp_path)
    res = run(SNAKEMAKE + ["-n", "--config", "bad_linez=skip"], wd)
    assert res.returncode != 0
    assert "bad_linez" in res.stderr + res.stdout
    res = run(SNAKEMAKE + ["-n", "--config", "seeds=notalist"], wd)
    assert res.returncode != 0 and "seeds" in res.stderr + res.stdout


def test_demo_workflow_end_to_end(tiny_workflow):
    wd = tiny_workflow  # every table and figure of tests/configs/tiny.yaml (conftest.py)
    with open(wd / "results/table7.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["blocks"] for r in rows] == ["2 blocks", "3 blocks", "4 blocks", "6 blocks", "12 blocks"]
    assert all(0 <= float(r["hr@10"]) <= 100 for r in rows)
    with open(wd / "results/table6.csv") as fh:
        t6 = {(r["column"], r["variant"]): r for r in csv.DictReader(fh)}
    ablations = ["w/o LayerDrop", "w/o gate", "frozen backbone", "w/o inter", "w/o intra"]
    assert list(t6) == [("IISAN-VS", v) for v in [*ablations, "IISAN-VS"]] + [("IISAN-VA", v) for v in [*ablations, "IISAN-VA"]]
    # the same experiment feeds both tables
    assert t6["IISAN-VS", "IISAN-VS"]["hr@10"] == rows[3]["hr@10"]
    m = json.loads(next((wd / "results/runs/demo").glob("*/iisan/blocks6/dropped/seed12345/metrics.json")).read_text())
    for key in ("valid", "test", "best_epoch", "history", "trainable_params", "time_per_epoch_train_s",
                "time_per_epoch_with_eval_s", "peak_memory_mb", "device", "seed", "config_hash"):
        assert key in m
    assert m["layers"] == [[0, 2, 4, 6, 8, 10, 12]] * 2
    # Table IV: one row per text encoder, the image-scaling row, then the text-encoder group means
    with open(wd / "results/table4.csv") as fh:
        t4 = list(csv.DictReader(fh))
    assert [r["text encoder"] for r in t4] == ["bert-demo", "bert-large-tiny", "llama-tiny", "llama70b-tiny",
                                               "bert-demo + vit-huge-tiny", "mean (PLM)", "mean (base LLM)", "mean (70B)"]
    assert float(t4[5]["hr@10"]) == pytest.approx((float(t4[0]["hr@10"]) + float(t4[1]["hr@10"])) / 2, abs=0.011)
    huge = "title@bert-demo+image@vit-huge-tiny/iisan-va/blocks6+stride6/dropped/seed12345/metrics.json"
    assert json.loads((wd / "results/runs/demo" / huge).read_text())["layers"] == [[0, 2, 4, 6, 8, 10, 12], [0, 2, 8, 14, 20, 26, 32]]
    va_run = "title@llama70b-tiny+image@vit-demo/iisan-va/stride6+blocks6/dropped/seed12345/metrics.json"
    va = json.loads((wd / "results/runs/demo" / va_run).read_text())
    assert va["layers"] == [[0, 5, 20, 35, 50, 65, 80], [0, 2, 4, 6, 8, 10, 12]]
    manifest = json.loads((wd / "resources/cache/demo/title/llama70b-tiny/manifest.json").read_text())
    assert manifest["quantization"] == "bnb-4bit" and manifest["pooling"] == "mean"
    with open(wd / "results/table8.csv") as fh:
        t8 = [r["selection"] for r in csv.DictReader(fh)]
    assert t8[:2] == ["text even_top12 / image even_all", "text even_all / image top"]
    with open(wd / "results/fig7.csv") as fh:
        f7 = {r["cache"]: r for r in csv.DictReader(fh)}
    assert set(f7) == {"full", "dropped"}
    assert f7["full"]["hr@10"] == f7["dropped"]["hr@10"]  # same seed, same states: same result
    # Table III: every method, one epoch for the baselines, three seeds and a t-test for VS vs VA
    with open(wd / "results/table3.csv") as fh:
        t3 = {r["method"]: r for r in csv.DictReader(fh)}
    assert list(t3) == ["FFT", "Adapter", "LoRA", "BitFit", "SASRec (ID)", "GRU4Rec (ID)", "IISAN-VS", "IISAN-VA"]
    assert t3["IISAN-VS"]["seeds"] == t3["IISAN-VA"]["seeds"] == "3" and t3["FFT"]["seeds"] == "1"
    assert 0 <= float(t3["IISAN-VA"]["hr@10 p (VA vs VS)"]) <= 1 and t3["IISAN-VA"]["hr@10 sig"] in ("", "*")
    assert float(t3["FFT"]["hr@10 vs FFT (%)"]) == 0 and t3["SASRec (ID)"]["TPME"] == ""
    assert int(t3["FFT"]["trainable_params"]) > int(t3["LoRA"]["trainable_params"])
    for method in ("fft", "adapter", "lora", "bitfit"):
        run_dir = wd / f"results/runs/demo/title@bert-demo+image@vit-demo/{method}/last/none/seed12345"
        assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 1
    assert (wd / "results/runs/demo/id/gru4rec/none/none/seed12345/metrics.json").exists()
    # Fig. 5 / efficiency.csv: every method at every batch size, TPME per batch size
    with open(wd / "results/efficiency.csv") as fh:
        eff = list(csv.DictReader(fh))
    assert [(r["method"], r["batch_size"]) for r in eff] == [
        (m, b) for b in ("2", "8") for m in ("FFT", "Adapter", "LoRA", "BitFit", "IISAN-VS (uncached)", "IISAN-VS")
    ]
    assert all(r["peak_memory_kind"] == "cpu_peak_rss" and float(r["time_per_epoch_s"]) > 0 for r in eff)
    assert max(float(r["TPME"]) for r in eff if r["batch_size"] == "8") <= 1.0
    for fig in ("fig4", "fig5", "fig6", "fig7"):
        assert (wd / f"results/{fig}.png").read_bytes()[:4] == b"\x89PNG"
    with open(wd / "results/fig6.csv") as fh:
        f6 = {r["backbone"]: r for r in csv.DictReader(fh)}
    assert int(f6["llama70b-tiny"]["computed_full_bytes"]) == 151 * 81 * 64 * 2
    assert int(f6["llama70b-tiny"]["measured_full_bytes"]) > int(f6["llama70b-tiny"]["measured_dropped_bytes"])
    # the HTML report lists every table and figure
    res = run(SNAKEMAKE + ["--configfile", "tests/configs/tiny.yaml", "--report", "report.html"], wd)
    assert res.returncode == 0, res.stderr[-2000:]
    html = (wd / "report.html").read_text(errors="replace")
    for name in ("table3.csv", "table4.csv", "table6.csv", "table7.csv", "table8.csv", "fig4.png", "fig5.png", "fig6.png", "fig7.png"):
        assert name in html
    # nothing to do on a second run, nor when only a speed knob changes
    res = run(SNAKEMAKE + ["-n", "--configfile", "tests/configs/tiny.yaml"], wd)
    assert "Nothing to be done" in res.stdout + res.stderr
    (wd / "speed.yaml").write_text("speed: {eval_batch: 7, cuda_graphs: false}\n")
    res = run(SNAKEMAKE + ["-n", "--configfile", "tests/configs/tiny.yaml", "speed.yaml"], wd)
    assert "Nothing to be done" in res.stdout + res.stderr
    # a hyper-parameter change reruns exactly the experiments it touches: Table VII's seven runs
    # (its 6-block row is Table III's IISAN-VS, over the three significance seeds)
    (wd / "no_h0.yaml").write_text("include_h0: false\n")
    res = run(SNAKEMAKE + ["results/table7.csv", "-n", "--configfile", "tests/configs/tiny.yaml", "no_h0.yaml"], wd)
    out = res.stdout + res.stderr
    stats = out[out.index("Job stats"):]
    assert re.search(r"^train\s+7$", stats, re.M) and re.search(r"^table\s+1$", stats, re.M), stats


def test_demo_structure_is_learnable(root, tmp_path):
    """On the default demo (config/config.yaml), a trained IISAN clearly beats popularity ranking."""
    import polars as pl
    import yaml

    cfg = yaml.safe_load((root / "config/config.yaml").read_text())
    raw = generate(tmp_path / "raw", DemoSpec(**cfg["dataset_sources"]["demo"]["demo"]))
    preprocess(raw["items"], raw["users"], tmp_path / "ds", images=raw["images"])
    titles = pl.read_parquet(tmp_path / "ds/items.parquet")["title"].to_list()
    data = load_sequences(tmp_path / "ds")
    layers = scheme_layers(cfg["default_scheme"], 12)
    caches = []
    for tower in cfg["towers"]:
        spec = BackboneSpec.from_config(tower["backbone"], cfg["backbones"][tower["backbone"]])
        build_standin(spec, tmp_path / spec.name, titles)
        build_cache(CacheJob.for_spec(spec, tower["field"]), str(tmp_path / spec.name), tmp_path / "ds/items.parquet",
                    tmp_path / "cache" / spec.name, images_archive=raw["images"], progress=False)
        caches.append(load_cache(tmp_path / "cache" / spec.name, backbone=spec.name, layers=layers,
                                 item_order_hash=data.item_order_hash)[0])
    train = TrainConfig(**dict(cfg["train"], max_epochs=10, patience=10))
    result = Trainer(data, CachedFeatures(caches), ModelConfig(), train, start_run(train.seed)).fit(progress=False)
    pop = popularity_baseline(data, "test")
    assert result["test"]["hr@10"] > 1.25 * pop["hr@10"], (result["test"], pop)


def test_microlens_demo_twin_is_generated_preprocessed_and_captioned(root, tmp_path):
    """The MicroLens-format twin goes through the MicroLens readers (raw counts as generated, every
    item with its cover); its videos' frames and covers are captioned by the LLaVA-NeXT stand-ins
    and a caption field is cached like a title; Tables V and IX are built on it; a MicroLens
    dataset plans the published files."""
    import polars as pl

    from iisan.data.microlens_demo import plan as demo_plan

    wd = copy_workflow(root, tmp_path)
    spec = {"n_items": 40, "n_users": 60, "video": {"min_frames": 8, "max_frames": 12}}
    over = f"dataset_sources={{mldemo: {{kind: microlens-demo, microlens_demo: {json.dumps(spec)}}}}}"
    fft = "results/runs/mldemo/cover_caption@bert-demo/fft/last/none/seed12345/metrics.json"
    targets = ["resources/mldemo/stats.json", "resources/cache/mldemo/video_caption/bert-demo/cache.npy", fft]
    overrides = [over, "captions={max_new_tokens: 4}", "standin_corpus=mldemo", "table9={dataset: mldemo}",
                 "table5={dataset: mldemo}", "train={max_epochs: 2}", "method_train={fft: {max_epochs: 1, item_slots: distinct}}"]
    res = run(SNAKEMAKE + ["--cores", "2", "--config", *overrides, "--", *targets], wd)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    stats = json.loads((wd / "resources/mldemo/stats.json").read_text())
    truth = demo_plan(spec)
    assert (stats["raw_users"], stats["raw_items"]) == (60, 40)
    assert stats["raw_interactions"] == sum(len(s) for _, s in truth.users)
    assert stats["blank_images"] == 0 and (wd / "resources/raw/mldemo/MicroLens-100k_videos").is_dir()
    items = pl.read_parquet(wd / "resources/mldemo/items.parquet")["item_id"].to_list()
    for source in ("cover", "video"):
        captions = pl.read_parquet(wd / f"resources/mldemo/captions/{source}.parquet")
        assert captions["item_id"].to_list() == items and all(c.strip() for c in captions["caption"])
    frames = json.loads((wd / "resources/mldemo/frames.json").read_text())
    assert frames["positions"] == [0.1, 0.5, 0.9] and frames["extracted"] == len(items)
    manifest = json.loads((wd / "resources/cache/mldemo/video_caption/bert-demo/manifest.json").read_text())
    assert manifest["field"] == "video_caption" and manifest["items"] == len(items)
    assert json.loads((wd / fft).read_text())["epochs_run"] == 1  # FFT on a caption field, backbone in the loop
    # Tables IX (nine rows to run: the FFT run on the cover caption is done) and V (five rows,
    # IISAN-VS and IISAN-VA over three significance seeds; IISAN-VS on title + image is Table IX's
    # row too, with the same three seeds): 11 + 6 runs, built end to end on the twin
    outputs = ["results/table9.csv", "results/table5.csv"]
    res = run(SNAKEMAKE + ["--cores", "2", "--config", *overrides, "--", *outputs], wd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert re.search(r"^train\s+17$", out, re.M), out[-2000:]
    with open(wd / "results/table9.csv") as fh:
        t9 = list(csv.DictReader(fh))
    config = workflow_config(root, **dict(o.split("=", 1) for o in overrides))
    assert [r["input"] for r in t9] == [r["label"] for r in tables.table_plan("table9", config)]
    assert {r["dataset"] for r in t9} == {"mldemo"} and all(0 <= float(r["hr@10"]) <= 100 for r in t9)
    with open(wd / "results/table5.csv") as fh:
        t5 = list(csv.DictReader(fh))
    cited, ours = [r for r in t5 if r["source"].startswith("cited: ")], [r for r in t5 if r["source"] == "rerun here"]
    assert len(cited) + len(ours) == len(t5) and cited and t5[:len(cited)] == cited  # published rows first, marked
    assert {r["dataset"] for r in cited} == {"MicroLens-100k (published)"} and {r["dataset"] for r in ours} == {"mldemo"}
    assert [(r["group"], r["method"]) for r in ours] == [
        ("MM VideoRec", "Full finetuning"), ("IDRec (SR)", "SASRec (rerun)"), ("IDRec (SR)", "GRU4Rec (rerun)"),
        ("IISAN-Versa", "IISAN-VS (ours)"), ("IISAN-Versa", "IISAN-VA (ours)")]  # the paper's classes and labels
    assert [r["seeds"] for r in ours] == ["1", "1", "1", "3", "3"]  # IISAN-VS and IISAN-VA over the significance seeds
    vs = next(r for r in ours if r["method"] == "IISAN-VS (ours)")
    versa = next(r for r in t9 if r["input"] == "IISAN-Versa: title + image")
    assert (vs["hr@10"], vs["ndcg@10"]) == (versa["hr@10"], versa["ndcg@10"])  # one run, two tables
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/paper.yaml", "--config", "mirror=/nonexistent", "--",
                           "resources/MicroLens/captions/video.parquet", "resources/MicroLens/captions/cover.parquet"], wd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    shards = workflow_config(root, "config/paper.yaml")["captions"]["shards"]
    for rule, n in (("fetch_microlens", 3), ("fetch_videos", 1), ("frames", 1), ("caption", 2 * shards), ("merge_captions", 2)):
        assert re.search(rf"^{rule}\s+{n}$", out, re.M), (rule, out[-2000:])


def test_real_text_config_plans_only_its_own_jobs(root, tmp_path, mirror):
    """Eight rows over two real encoders, three seeds each: MiniLM from its package (read with its
    [CLS] token and, a second registry entry, with its masked mean), MPNet assembled from its PyPI
    parts (one job); three caches, no stand-in."""
    wd = copy_workflow(root, tmp_path)
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/amazon-real-text.yaml", "--config", f"mirror={mirror}"], wd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    stats = out[out.index("Job stats"):]
    for rule, n in (("train", 24), ("cache", 3), ("prune", 8), ("assemble_backbone", 1)):
        assert re.search(rf"^{rule}\s+{n}$", stats, re.M), (rule, stats)
    assert "build_standin" not in stats and "results/amazon-real-text.csv" in out


def test_paper_config_plans_table3_and_fig5_on_three_datasets(root, tmp_path):
    wd = copy_workflow(root, tmp_path)
    for ds in ("Scientific", "Instrument", "Office"):  # placeholder image archives
        (wd / f"resources/raw/{ds}").mkdir(parents=True)
        (wd / f"resources/raw/{ds}/images.zip").write_bytes(b"")
    res = run(SNAKEMAKE + ["-n", "--configfile", "config/paper.yaml"], wd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    stats = out[out.index("Job stats"):]
    # efficiency: 6 methods x 6 batch sizes on Scientific
    assert re.search(r"^profile\s+36$", stats, re.M), stats
    for ds in ("Scientific", "Instrument", "Office"):
        assert f"results/runs/{ds}/title@bert-base+image@vit-base/fft/last/none/seed12345/metrics.json" in out
        assert f"results/runs/{ds}/title@bert-large+image@vit-base/iisan-va/blocks6/dropped/seed12347/metrics.json" in out
        assert f"results/runs/{ds}/id/gru4rec/none/none/seed12345/metrics.json" in out
    assert "results/table3.csv" in out and "results/fig5.png" in out
    # docs/method.md §8: LLM-text runs train with batch 512 on Scientific (the paper runs Table IV
    # on Scientific only), the others with 64, the baselines with 32
    config = workflow_config(root, "config/paper.yaml")
    batches = {}
    for path in set(re.findall(r"results/runs/\S+/metrics.json", out)):
        parts = path.split("/")
        exp = plan.experiment(config, *parts[2:7], seed=int(parts[7][4:]))
        text = [t.backbone for t in exp.towers if t.field == "title"]
        llm = parts[2] if parts[2] in ("Scientific", "MicroLens") else "other"
        batches.setdefault((text[0] if text else "id", exp.method, llm), set()).add(exp.train.batch_size)
    assert batches[("llama3-8b", "iisan-va", "Scientific")] == batches[("llama3-70b-gptq", "iisan-va", "Scientific")] == {512}
    assert not any(k[0].startswith(("llama", "gemma", "mistral", "mixtral")) and k[2] == "other" for k in batches)
    for ds in ("Scientific", "other"):
        assert batches[("bert-large", "iisan-va", ds)] == {64} and batches[("bert-base", "iisan", ds)] == {64}
        assert batches[("bert-base", "fft", ds)] == {32} and batches[("id", "sasrec-id", ds)] == {64}
    # Tables V and IX on MicroLens, IISAN trained as the authors' MicroLens script (batch 512)
    assert "results/table5.csv" in out and "results/table9.csv" in out
    assert batches[("bert-base", "iisan", "MicroLens")] == batches[("bert-large", "iisan-va", "MicroLens")] == {512}
    assert batches[("id", "gru4rec", "MicroLens")] == {512}


def test_tiny_outputs_equal_the_golden_ones(tiny_workflow):
    """Every table and figure CSV and every run's result of the tiny config, as recorded in
    tests/golden/ for this machine's bitsandbytes path (exact on the CPU it was recorded on,
    within tolerance elsewhere; see tests/golden.py). A change of any metric fails here; a
    deliberate one rewrites the files with `python tests/golden.py`."""
    from golden import differences

    problems, exact = differences(tiny_workflow)
    assert not problems, f"{len(problems)} differences ({'exact' if exact else 'within tolerance'}): {problems[:10]}"
