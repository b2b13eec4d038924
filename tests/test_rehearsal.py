"""The rehearsal (config/rehearsal.yaml over config/paper.yaml): the paper's DAG with the rehearsal's
own rules added and nothing else changed, the twins in the authors' layout, the stand-ins as hub
snapshots that huggingface_hub resolves offline, and one cache job of the paper's plan run from
them through the real fetch rules."""

import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from iisan.pipeline import rehearsal
from iisan.pipeline.workflow import load_yaml

from conftest import SNAKEMAKE, copy_workflow, run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["config/paper.yaml", "config/rehearsal.yaml"]
OWN = {"rehearsal_mirror", "rehearsal_hub"}


def test_twin_of_an_amazon_dataset_has_the_authors_names_and_archive_layout(tmp_path):
    source = load_yaml(ROOT / "config/paper.yaml")["dataset_sources"]["Scientific"]
    source["demo"] = {"n_items": 30, "n_users": 40, "n_groups": 2, "n_subgroups": 2, "image_size": 8}
    files = rehearsal.build_mirror("Scientific", source, tmp_path)
    assert set(files) == {source["items"], source["users"], "am_image_is.zip"}
    with zipfile.ZipFile(tmp_path / "am_image_is.zip") as zf:
        names = zf.namelist()
    ids = [line.split("\t")[0] for line in (tmp_path / source["items"]).read_text().splitlines()]
    assert sorted(names) == sorted(f"am_image_is/{i}.jpg" for i in ids)


@pytest.mark.slow
def test_stand_in_snapshot_is_fetched_offline_at_its_revision(tmp_path):
    """A hub snapshot laid out by build_hub_snapshot is what snapshot_download finds with
    HF_HUB_OFFLINE=1 at the entry's branch; fetch_model links it into the model's folder."""
    entry = {"source": "example-org/tiny-llama", "family": "llama", "modality": "text", "layers": 2, "hidden": 32,
             "heads": 2, "pooling": "mean", "revision": "v2"}
    record = rehearsal.build_hub_model("backbones", "tiny", entry, ["a title", "another title"], tmp_path / "hub",
                                       tmp_path / "record.json")
    assert json.loads((tmp_path / "record.json").read_text()) == record
    repo = rehearsal.repo_folder(tmp_path / "hub", entry["source"])
    assert (repo / "refs/v2").read_text() == record["commit"]
    assert all(p.is_symlink() for p in (repo / "snapshots" / record["commit"]).rglob("*") if not p.is_dir())
    dest = tmp_path / "resources/backbones/tiny"
    code = (f"from iisan.encoders.models_fetch import fetch_model; import json; print(json.dumps(fetch_model("
            f"{entry['source']!r}, {str(dest)!r}, revision='v2', cache_dir={str(tmp_path / 'hub')!r})))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["commit"] == record["commit"]
    assert json.loads((dest / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.slow
def test_rehearsal_plans_the_papers_jobs_plus_its_own(paper_graph):
    """Same rules and the same jobs per rule as config/paper.yaml's DAG; only the rehearsal's own
    rules are added (one twin per fetched dataset, one stand-in per hub model)."""
    import os

    from iisan.pipeline.graph import job_graph

    before = dict(os.environ)
    graph = job_graph(ROOT, CONFIG)
    assert dict(os.environ) == before  # the rehearsal's HF_HUB_OFFLINE stays in the Snakefile's run
    ours = Counter(n.rule for n in graph.nodes)
    paper = Counter(n.rule for n in paper_graph.nodes)
    assert {r: c for r, c in ours.items() if r not in OWN} == paper
    assert ours["rehearsal_mirror"] == len({n.wildcards["dataset"] for n in paper_graph.nodes
                                          if n.rule.startswith("fetch_") and "dataset" in n.wildcards}) == 4
    assert ours["rehearsal_hub"] == paper["fetch_backbone"] + paper["fetch_captioner"] == 18
    assert graph.config["rehearsal"] is True and paper_graph.config["rehearsal"] is False


@pytest.mark.slow
def test_one_cache_job_of_the_paper_runs_from_the_mirror_and_the_hub_snapshot(tmp_path):
    """Table VII's text cache on Scientific: the twin fetched from the mirror, the BERT-base
    stand-in fetched from the hub cache offline, preprocessed and cached by the paper's rules."""
    wd = copy_workflow(ROOT, tmp_path)
    target = "resources/cache/Scientific/title/bert-base/cache.npy"
    small = "dataset_sources={Scientific: {demo: {n_items: 60, n_users: 100, n_groups: 2, n_subgroups: 2, image_size: 8}}}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    res = run(SNAKEMAKE + ["--cores", "2", "--configfile", *CONFIG, "--config", small, "worker=false", "--", target], wd, env=env,
              timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    out = res.stdout + res.stderr
    for rule in ("rehearsal_mirror", "fetch_amazon", "fetch_amazon_images", "preprocess", "rehearsal_hub", "fetch_backbone", "cache"):
        assert f"rule {rule}:" in out, rule
    fetched = json.loads((wd / "resources/backbones/bert-base/.fetched.json").read_text())
    made = json.loads((wd / rehearsal.hub_record("backbones", "bert-base")).read_text())
    assert fetched["repo_id"] == "google-bert/bert-base-uncased" and fetched["commit"] == made["commit"]
    assert "cannot list" in (wd / "logs/backbones/bert-base.log").read_text()  # the hub was not asked: offline
    assert (wd / target).stat().st_size > 0


@pytest.mark.slow
def test_every_fetch_and_its_rehearsal_source_runs_on_the_submit_host():
    """On a cluster the rules that reach the internet (and, in the rehearsal, the rules standing in
    for it) run where Snakemake runs: compute nodes may have no network."""
    code = f"""
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings import types as t
with SnakemakeApi(t.OutputSettings()) as api:
    w = api.workflow(resource_settings=t.ResourceSettings(), storage_settings=t.StorageSettings(), snakefile=Path('Snakefile'),
                     config_settings=t.ConfigSettings(configfiles=[Path(f) for f in {CONFIG!r}]), workdir=Path('.'))._workflow
    print(sorted(r.name for r in w.rules if r.name.startswith(('fetch_', 'rehearsal_')) and r.name not in w._localrules))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
