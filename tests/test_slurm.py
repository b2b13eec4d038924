"""The demo workflow submitted through a real single-node SLURM (slurmctld + slurmd + munge on
localhost, a fake GPU in gres.conf) with `--workflow-profile profiles/slurm`; the results must
equal a local run's. Needs root (CI runs as root); the daemons are started and stopped here."""

import csv
import os
import shutil
import subprocess

import pytest

from conftest import SNAKEMAKE, copy_workflow, run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None and shutil.which("slurmctld") is None,
                                reason="a local SLURM needs root and Debian's slurm-wlm/munge")]

TARGET = "results/table7.csv"


@pytest.fixture
def slurm(root, tmp_path):
    state = tmp_path / "slurm-state"
    res = subprocess.run(["bash", str(root / "tests/slurm/start.sh"), str(state)], capture_output=True, text=True)
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(root / "tests/slurm/stop.sh"), str(state)], capture_output=True)


def read_metrics(path):
    with open(path) as fh:
        return [(r["dataset"], r["blocks"], r["hr@10"], r["ndcg@10"], r["trainable_params"]) for r in csv.DictReader(fh)]


def test_workflow_through_slurm_equals_local_run(root, tmp_path, slurm, tiny_workflow):
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail("the SLURM executor plugin is not installed (pip install -e '.[test]')")
    (tmp_path / "cluster").mkdir()
    cluster = copy_workflow(root, tmp_path / "cluster")
    args = [TARGET, "--configfile", "tests/configs/tiny.yaml", "tests/configs/slurm.yaml"]
    res = run(
        SNAKEMAKE + args + [
            "--workflow-profile", "profiles/slurm",
            "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=30",
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
            "--seconds-between-status-checks", "5", "--jobs", "4", "--latency-wait", "10",
        ],
        cluster, env=slurm, timeout=1800,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    # the jobs really went through the scheduler: one SLURM job per rule instance
    out = res.stdout + res.stderr
    submitted = [line for line in out.splitlines() if "has been submitted with SLURM jobid" in line]
    assert len(submitted) >= 8, out[-3000:]
    assert any("rule_train" in line for line in submitted)
    # the local run: the session's tiny workflow (conftest.py), same config but for resources
    assert read_metrics(cluster / TARGET) == read_metrics(tiny_workflow / TARGET)
