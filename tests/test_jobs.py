"""A job's output goes to its rule's log; with keep_attempts, every attempt of a job stays in it."""

import os
import subprocess
import sys

import pytest

JOB = """
import logging, os, sys
from types import SimpleNamespace
from iisan.pipeline.jobs import job

snakemake = SimpleNamespace(log=[sys.argv[1]], threads=1, resources=SimpleNamespace(attempt=int(sys.argv[2])))
with job(snakemake, keep_attempts=True):
    print("python stdout", sys.argv[2])
    logging.getLogger("iisan.test").info("a log record")
    os.write(2, b"native stderr\\n")
    if sys.argv[2] == "1":
        raise SystemExit("attempt 1 failed")
"""


@pytest.mark.slow
def test_every_attempt_of_a_job_stays_in_its_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    first = subprocess.run([sys.executable, "-c", JOB, str(log), "1"], capture_output=True, text=True)
    assert first.returncode != 0 and first.stdout == ""  # nothing escapes to the terminal
    log.unlink()  # Snakemake deletes the log before the next attempt
    second = subprocess.run([sys.executable, "-c", JOB, str(log), "2"], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    text = log.read_text()
    for part in ("attempt 1 ==", "python stdout 1", "attempt 1 failed", "attempt 2 ==", "python stdout 2", "a log record",
                 "native stderr"):
        assert part in text, (part, text)
    assert text.index("attempt 1 ==") < text.index("attempt 2 ==")
    assert (tmp_path / "logs" / "run.log.attempts").read_text() == text


def test_jobs_share_the_compile_cache_folder(tmp_path):
    """A job points TORCHINDUCTOR_CACHE_DIR at the config's compile_cache before torch loads; a
    value already in the environment wins."""
    code = """
import os, sys
from types import SimpleNamespace
from iisan.pipeline.jobs import job

snakemake = SimpleNamespace(log=[sys.argv[1]], threads=0, config={"compile_cache": "cc"})
with job(snakemake):
    print(os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "torch" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.log")], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "a.log").read_text().split()[-2:] == [str((tmp_path / "cc").resolve()), "False"]
    env["TORCHINDUCTOR_CACHE_DIR"] = "/elsewhere"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.log")], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "b.log").read_text().split()[-2:] == ["/elsewhere", "False"]


def test_sigterm_stops_a_job_at_once_cleanly_and_non_zero(tmp_path):
    """Snakemake does not forward SIGTERM to running jobs (it waits for them); a job that gets it
    (SIGTERM to the process group, or from SLURM) stops at once: a `finally` runs, an atomic write
    in progress leaves no temporary file, the log says so and the status is 143."""
    import signal
    import time

    code = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from iisan.io import atomic_path
from iisan.pipeline.jobs import job

snakemake = SimpleNamespace(log=[sys.argv[1]], threads=0)
with job(snakemake):
    try:
        with atomic_path(Path(sys.argv[2]) / "out.json") as tmp:
            tmp.write_text("half")
            Path(sys.argv[2], "ready").touch()
            time.sleep(60)
    finally:
        print("cleanup ran")
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "job.log"), str(tmp_path)])
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143 and time.time() - start < 5
    text = (tmp_path / "job.log").read_text()
    assert "cleanup ran" in text and "stopped by SIGTERM" in text and "rerun the workflow to resume" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.log", "ready"]


def test_a_crash_by_signal_leaves_the_python_stack_in_the_log(tmp_path):
    """SIGBUS (a memory-mapped write on a full disk) or SIGSEGV would otherwise leave an empty log."""
    code = """
import os, signal, sys
from types import SimpleNamespace
from iisan.pipeline.jobs import job

def write_rows():
    os.kill(os.getpid(), signal.SIGBUS)

with job(SimpleNamespace(log=[sys.argv[1]], threads=0)):
    write_rows()
"""
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.log")], capture_output=True, text=True)
    text = (tmp_path / "job.log").read_text()
    assert res.returncode != 0 and "Fatal Python error: Bus error" in text and "write_rows" in text, text


def test_a_job_stopped_by_sigterm_records_its_attempt(tmp_path):
    """SIGTERM (a cluster's time limit) leaves `<log>.stops` naming the attempt; a new first attempt
    forgets earlier records; memory_factor_of counts only the other failures."""
    import signal
    import time

    from iisan.pipeline.jobs import memory_factor_of, stops_file

    code = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from iisan.pipeline.jobs import job

snakemake = SimpleNamespace(log=[sys.argv[1]], threads=0, resources=SimpleNamespace(attempt=int(sys.argv[2])))
with job(snakemake):
    Path(sys.argv[1] + ".ready").touch()
    time.sleep(60)
"""
    log = tmp_path / "job.log"

    def stopped(attempt):
        (tmp_path / "job.log.ready").unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", code, str(log), str(attempt)])
        deadline = time.time() + 60
        while not (tmp_path / "job.log.ready").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143

    stopped(1)
    assert stops_file(log).read_text().split() == ["1"]
    assert memory_factor_of(log, 2) == 1  # a time-out: the retry asks the same memory
    stopped(2)
    assert memory_factor_of(log, 3) == 1
    stops_file(log).write_text("2\n")  # attempt 1 failed otherwise (an OOM kill leaves no record)
    assert memory_factor_of(log, 3) == 2 and memory_factor_of(log, 2) == 2
    stopped(1)  # a new run of the job: the earlier record is gone
    assert stops_file(log).read_text().split() == ["1"]


def test_a_job_under_slurm_says_which_allocation_runs_it():
    from iisan.pipeline.jobs import slurm_allocation

    line = slurm_allocation({"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "gpu03", "SLURM_JOB_PARTITION": "gpu",
                             "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_NODE": "87000", "CUDA_VISIBLE_DEVICES": "3,4"})
    assert line == "SLURM job 7 on gpu03, partition gpu: 4 CPUs, 87000 MB, CUDA_VISIBLE_DEVICES=3,4"


@pytest.mark.slow
def test_a_retry_after_a_time_out_asks_for_more_time_not_more_memory(root, tmp_path):
    """A GPU job's runtime is its estimate times the attempt, at most cluster.max_runtime_min; its
    memory grows on a retry only when the attempt before was not stopped by the time limit."""
    from iisan.pipeline.graph import job_graph
    from iisan.pipeline.jobs import stops_file

    from conftest import copy_workflow

    wd = copy_workflow(root, tmp_path)
    overrides = {"gpus_per_job": "1", "cluster": "{max_runtime_min: 25, runtime_margin: 1}"}

    def train(attempt):
        graph = job_graph(wd, ["tests/configs/tiny.yaml"], overrides, ["results/table7.csv"], attempt=attempt)
        node = min((n for n in graph.nodes if n.rule == "train"), key=lambda n: n.name)
        w = node.wildcards
        log = wd / f"logs/train/{w['dataset']}/{w['towers']}/{w['method']}/{w['scheme']}/{w['cache']}/seed{w['seed']}.log"
        return node.resources, log

    first, log = train(1)
    assert first["runtime"] == 10  # the floor: a tiny run
    oom, _ = train(2)  # attempt 1 failed and left no stop record: more memory, more time
    assert oom["mem_mb"] == 2 * first["mem_mb"] and oom["runtime"] == min(2 * first["runtime"], 25)
    log.parent.mkdir(parents=True, exist_ok=True)
    stops_file(log).write_text("1\n")  # attempt 1 was stopped by the time limit
    timeout, _ = train(2)
    assert timeout["mem_mb"] == first["mem_mb"] and timeout["runtime"] == min(2 * first["runtime"], 25)
    assert train(3)[0]["runtime"] == 25
