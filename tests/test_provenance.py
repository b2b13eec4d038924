"""A table or figure takes a run's metrics.json (or a profile) only when it holds that run's
experiment: another run's file is moved aside and named, and the workflow's next run retrains it.
(Caption sets checked against their manifests: test_captions.py; undecodable images:
test_data.py.)"""

import json
import re
import shutil

import polars as pl
import pytest

from iisan import tables
from iisan.config import Experiment
from iisan.io import DamagedFileError, write_json
from iisan.pipeline import plan
from iisan.tables.build import ForeignRunError, read_runs

from conftest import ROOT, workflow_config


@pytest.fixture(scope="module")
def tiny():
    return workflow_config(ROOT, "tests/configs/tiny.yaml")


def _experiment(config: dict, path: str) -> Experiment:
    """The experiment of a run or profile path, as the train rule's params give it (from its wildcards)."""
    _, kind, dataset, towers, method, scheme, cache, last = path.split("/")[:8]
    seed = last.removeprefix("seed") if kind == "runs" else config["seeds"][0]
    exp = plan.experiment(config, dataset, towers, method, scheme, cache, seed)
    return exp if kind == "runs" else plan.profile_experiment(config, dataset, towers, method, scheme, cache)


def _train(config: dict, wd, path: str, hr: float) -> None:
    """What a train job writes (iisan.training.experiment.run_experiment): its metrics and its experiment,
    the one the rule's params give, read back as the job reads them (with the speed settings)."""
    exp = Experiment.from_dict(_experiment(config, path).to_dict()).with_speed(config.get("speed"))
    write_json(wd / path, {"test": {"hr@10": hr, "ndcg@10": hr / 2}, "trainable_params": 10, "best_epoch": 1,
                           "time_per_epoch_train_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "cpu-rss",
                           "experiment": exp.to_dict(), "config_hash": exp.hash(), "cache": exp.cache})


def _build(name, runs, wd):
    return tables.build_table(name, [r for r, _ in runs], [wd / p for _, p in runs], wd / f"results/{name}.csv")


def test_the_plans_identity_is_what_a_train_job_records(tiny):
    """A row's config_hash is the hash of the train rule's params `experiment`, and the job, which
    reads those params back with the speed settings, records the same experiment and hash."""
    for name in tiny["tables"]:
        for row, path in tables.plan_runs(name, tiny):
            exp = _experiment(tiny, path)
            ran = Experiment.from_dict(exp.to_dict()).with_speed({"checkpoint_every_s": 5})
            assert ran.to_dict() == exp.to_dict() and ran.hash() == exp.hash() == row["config_hash"], path
    for row, path in tables.efficiency_plan(tiny):
        assert _experiment(tiny, path).hash() == row["config_hash"], path


def test_another_runs_metrics_are_moved_aside_and_named_then_retrained(tiny, tmp_path):
    runs = tables.plan_runs("table7", tiny)
    hr = {row["key"]: 0.01 * (n + 1) for n, (row, _) in enumerate(runs)}
    for row, path in runs:
        _train(tiny, tmp_path, path, hr[row["key"]])
    good = _build("table7", runs, tmp_path)
    assert dict(zip(good["key"], good["hr@10"])) == {k: round(100 * v, 2) for k, v in hr.items()}

    (two,) = [p for r, p in runs if r["key"] == "blocks2"]
    (three_row, three) = next((r, p) for r, p in runs if r["key"] == "blocks3")
    shutil.copy(tmp_path / two, tmp_path / three)
    found = json.loads((tmp_path / two).read_text())["config_hash"]
    with pytest.raises(ForeignRunError) as err:
        _build("table7", runs, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / three}: another run's result: expected experiment {three_row['config_hash']}")
    assert f"found experiment {found} (dataset demo, towers title@bert-demo+image@vit-demo, method iisan, scheme blocks2" in msg
    assert "rerun the workflow: it retrains this run" in msg
    assert not (tmp_path / three).exists()
    (aside,) = (tmp_path / three).parent.glob("metrics.json.damaged-*")
    assert json.loads(aside.read_text())["config_hash"] == found  # nothing is lost
    assert pl.read_csv(tmp_path / "results/table7.csv")["hr@10"].to_list() == good["hr@10"].to_list()  # the table is not rewritten

    _train(tiny, tmp_path, three, hr["blocks3"])  # what the workflow's next run does
    again = _build("table7", runs, tmp_path)
    assert again.equals(good)


def test_an_edited_or_unlabelled_metrics_file_is_moved_aside_and_every_bad_one_named(tiny, tmp_path):
    runs = tables.plan_runs("table7", tiny)
    for _, path in runs:
        _train(tiny, tmp_path, path, 0.05)
    first, second = (tmp_path / p for _, p in runs[:2])
    m = json.loads(first.read_text())
    m["experiment"]["scheme"] = "blocks9"  # the experiment edited, its hash kept
    first.write_text(json.dumps(m))
    m = json.loads(second.read_text())
    del m["experiment"], m["config_hash"]
    second.write_text(json.dumps(m))
    with pytest.raises(ForeignRunError) as err:
        read_runs([r for r, _ in runs], [tmp_path / p for _, p in runs])
    msg = str(err.value)
    assert msg.startswith(f"2 of {len(runs)} metrics files cannot be used and were moved aside")
    assert f"{first}: another run's result: its field 'config_hash' is " in msg and "pieced together" in msg
    assert f"{second}: another run's result: it records no experiment" in msg
    assert not first.exists() and not second.exists() and all((tmp_path / p).exists() for _, p in runs[2:])


def test_a_profile_of_another_batch_size_is_moved_aside(tiny, tmp_path):
    plans = tables.efficiency_plan(tiny)
    for row, path in plans:
        exp = _experiment(tiny, path)
        write_json(tmp_path / path, {"batch_size": row["batch_size"], "time_per_epoch_train_s": 1.0, "time_source": "measured",
                                     "peak_memory_mb": 1.0, "peak_memory_kind": "cpu-rss", "trainable_params": 1,
                                     "total_params": 2, "device": "cpu", "experiment": exp.to_dict()})
    rows, paths = [r for r, _ in plans], [tmp_path / p for _, p in plans]
    assert len(read_runs(rows, paths, "profiles")) == len(plans)
    shutil.copy(paths[0], paths[1])  # FFT at batch 2 over FFT at batch 8: the same experiment
    with pytest.raises(ForeignRunError, match=rf"{re.escape(str(paths[1]))}: another run's result: expected batch size 8, "
                                              r"found 2; moved aside to .*; rerun the workflow: it profiles this run again"):
        read_runs(rows, paths, "profiles")


def test_a_row_without_an_identity_is_read_as_before(tmp_path):
    """Rows made by hand (no config_hash) are not checked; an unreadable file still is."""
    path = tmp_path / "m.json"
    write_json(path, {"hr@10": 0.5})
    assert read_runs([{"label": "x"}], [path]) == [({"label": "x"}, {"hr@10": 0.5})]
    path.write_text("{")
    with pytest.raises(DamagedFileError, match="unreadable"):
        read_runs([{"label": "x"}], [path])



def test_a_report_is_refused_while_a_table_stands_for_runs_that_are_gone_or_newer(tiny, tmp_path, monkeypatch):
    """`snakemake --report` packs the tables as they are: while one of them stands for a run that
    was deleted or remade since it was built, the report is refused, naming the table and runs."""
    import os
    import subprocess
    import sys

    from iisan.pipeline.workflow import StaleReportError, refuse_stale_report, stale_outputs

    config = dict(tiny, tables=["table7"], figures=[])
    monkeypatch.chdir(tmp_path)
    runs = [p for _, p in tables.plan_runs("table7", config)]
    for path in runs:
        _train(config, tmp_path, path, 0.05)
    table = tmp_path / "results/table7.csv"
    table.write_text("dataset\n")
    assert stale_outputs(config) == []
    refuse_stale_report(config)
    (tmp_path / runs[0]).unlink()
    os.utime(tmp_path / runs[1], (table.stat().st_mtime + 10,) * 2)
    got = stale_outputs(config)
    assert got == [f"results/table7.csv: 1 of its {len(runs)} runs are gone: {runs[0]}",
                   f"results/table7.csv: 1 of its {len(runs)} runs are newer than it: {runs[1]}"]
    with pytest.raises(StaleReportError, match="run the workflow to completion first"):
        refuse_stale_report(config)
    # through Snakemake, as the README asks for the report: the named error alone, no report
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--configfile",
                          str(ROOT / "tests/configs/tiny.yaml"), "--config", "tables=[table7]", "figures=[]",
                          "--report", "report.html"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and not (tmp_path / "report.html").exists()
    assert "results/table7.csv: 1 of its" in res.stderr and "runs are gone" in res.stderr, res.stderr[-3000:]
