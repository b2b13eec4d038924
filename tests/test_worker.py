"""The warm worker (`iisan worker`, iisan.pipeline.worker): a job it runs behaves as the job's own process
would (directory, environment, umask, stdin/stdout/stderr, exit status, signals, results), and a
job it cannot run exactly so runs in its own process and says why."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iisan.pipeline.worker import ENV

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k != ENV}
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS)])
    return {**e, **extra}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One worker for the module, with this module's job functions (and a probe module) preloaded."""
    home = tmp_path_factory.mktemp("worker")
    (home / "stale_probe.py").write_text("X = 1\n")
    sock = home / "w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "iisan.cli", "worker", "--socket", str(sock),
                             "--preload", "worker_jobs", "stale_probe"],
                            env=env(PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), str(home)])),
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "listening at" in line, line + proc.stderr.read()
    yield {"sock": sock, "home": home, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


def job(worker, target: str, *args, via_worker=True, wait=True, stdin="", cwd=None, flags=(), **extra):
    """A job process as a workflow script is one: it calls iisan.pipeline.worker.run(target, *args)."""
    code = f"import sys; from iisan.pipeline.worker import run; sys.exit(run({target!r}, *{args!r}))"
    e = env(PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), str(worker["home"])]), **extra)
    if via_worker:
        e[ENV] = str(worker["sock"])
    proc = subprocess.Popen([sys.executable, *flags, "-c", code, "an-argument"], env=e, cwd=cwd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(stdin, timeout=120)
    return proc, out, err


def test_a_job_runs_in_the_worker_as_in_its_own_process(worker, tmp_path):
    out = tmp_path / "report.json"
    old = os.umask(0o027)  # what the job process has, the job gets
    try:
        proc, stdout, stderr = job(worker, "worker_jobs:report", str(out), stdin="some input",
                                   cwd=tmp_path, CUDA_VISIBLE_DEVICES="3", JOB_MARKER="m1")
    finally:
        os.umask(old)
    assert proc.returncode == 0, stderr
    r = json.loads(out.read_text())
    assert r["pid"] != proc.pid and r["torch_was_imported"]  # ran in a child of the warm worker
    assert r["cwd"] == str(tmp_path) and r["cuda_visible"] == "3" and r["marker"] == "m1"
    assert r["nvml_check"] is None  # the worker's imports asked NVML; the job has its own environment
    assert r["umask"] == 0o027 and r["stdin"] == "some input" and r["argv"] == ["-c", "an-argument"]
    assert "hello from the job on stdout" in stdout and "hello from the job on stderr" in stderr
    assert "iisan:" not in stderr  # nothing said about running elsewhere

    # without IISAN_WORKER the same call runs in the job's process
    proc, _, stderr = job(worker, "worker_jobs:report", str(out), via_worker=False, cwd=tmp_path)
    assert proc.returncode == 0, stderr
    own = json.loads(out.read_text())
    assert own["pid"] == proc.pid and not own["torch_was_imported"]
    assert own["path"] == r["path"]  # the job script's import path, not the worker's


@pytest.mark.parametrize(("arg", "status", "says"), [("raise", 1, "ValueError: the job failed on purpose"),
                                                     (3, 3, ""), ("a message", 1, "a message")])
def test_exit_status_and_traceback_are_the_jobs(worker, arg, status, says):
    for via_worker in (True, False):
        proc, _, stderr = job(worker, "worker_jobs:fail", arg, via_worker=via_worker)
        assert proc.returncode == status and says in stderr, (via_worker, stderr)


def pid_from(marker: Path, proc) -> int:
    for _ in range(600):
        if marker.exists() and marker.read_text():
            return int(marker.read_text())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the job did not start")


def gone(pid: int, seconds: float = 20) -> bool:
    """Whether process `pid` ends (or is a zombie nobody reaps) within `seconds`."""
    for _ in range(int(seconds / 0.05)):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_the_job_process_stops_the_job(worker, tmp_path, how):
    """SIGTERM and SIGINT are passed on (the job process then ends as the job did); SIGKILL, which
    cannot be, ends the connection and with it the job."""
    marker = tmp_path / "pid"
    proc = job(worker, "worker_jobs:wait", str(marker), wait=False)
    child = pid_from(marker, proc)
    assert child != proc.pid
    proc.send_signal(how)
    proc.wait(timeout=60)
    assert gone(child)
    assert proc.returncode == {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: -signal.SIGINT,
                               signal.SIGKILL: -signal.SIGKILL}[how]


@pytest.mark.slow
def test_training_in_the_worker_gives_the_same_result(worker, tmp_path):
    results = []
    for via_worker in (True, False):
        out = tmp_path / f"result-{via_worker}.json"
        proc, _, stderr = job(worker, "worker_jobs:train", str(out), via_worker=via_worker)
        assert proc.returncode == 0, stderr
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and results[0]["epochs_run"] == 4


def test_a_job_the_worker_cannot_run_exactly_runs_in_its_own_process(worker, tmp_path):
    out = tmp_path / "report.json"
    # a variable read when torch or transformers is imported, which the worker read without it
    proc, _, stderr = job(worker, "worker_jobs:report", str(out), HF_HUB_OFFLINE="1")
    assert proc.returncode == 0 and json.loads(out.read_text())["pid"] == proc.pid
    assert "did not take the job (environment variable HF_HUB_OFFLINE is '1' for the job, None for the worker" in stderr

    # other interpreter options (-O drops asserts)
    proc, _, stderr = job(worker, "worker_jobs:report", str(out), flags=("-O",))
    assert proc.returncode == 0 and json.loads(out.read_text())["pid"] == proc.pid
    assert "did not take the job (the job's interpreter options differ from the worker's" in stderr

    # a module the worker imported has changed on disk since
    probe = worker["home"] / "stale_probe.py"
    st = probe.stat()
    os.utime(probe, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        proc, _, stderr = job(worker, "worker_jobs:report", str(out))
        assert proc.returncode == 0 and json.loads(out.read_text())["pid"] == proc.pid
        assert f"{probe} has changed since the worker started; restart it" in stderr
    finally:
        os.utime(probe, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc, _, stderr = job(worker, "worker_jobs:report", str(out))
    assert json.loads(out.read_text())["pid"] != proc.pid  # as it was: the worker takes it again


def test_no_worker_there_runs_the_job_in_its_own_process(tmp_path):
    out = tmp_path / "report.json"
    proc, _, stderr = job({"sock": tmp_path / "none.sock", "home": tmp_path}, "worker_jobs:report", str(out))
    assert proc.returncode == 0 and json.loads(out.read_text())["pid"] == proc.pid
    assert f"no worker at {tmp_path / 'none.sock'}" in stderr


def test_a_hung_worker_does_not_hold_the_job(worker, tmp_path):
    """A worker that does not answer (stopped here): the job runs in its own process after
    IISAN_WORKER_TIMEOUT seconds, and not a second time when the worker wakes up."""
    out = tmp_path / "report.json"
    worker["proc"].send_signal(signal.SIGSTOP)
    try:
        proc, _, stderr = job(worker, "worker_jobs:report", str(out), IISAN_WORKER_TIMEOUT="1")
    finally:
        worker["proc"].send_signal(signal.SIGCONT)
    assert proc.returncode == 0 and "did not take the job (no answer within 1 s)" in stderr
    ran = json.loads(out.read_text())
    assert ran["pid"] == proc.pid
    time.sleep(2)  # the woken worker forks a child for the old connection; its answer fails
    assert json.loads(out.read_text()) == ran
    proc, _, stderr = job(worker, "worker_jobs:report", str(out))
    assert json.loads(out.read_text())["pid"] != proc.pid, stderr  # and it takes the next job


@pytest.mark.slow
def test_worker_refuses_a_second_one_and_cleans_up(tmp_path):
    sock = tmp_path / "w.sock"
    first = subprocess.Popen([sys.executable, "-m", "iisan.cli", "worker", "--socket", str(sock)], env=env(),
                             stderr=subprocess.PIPE, text=True)
    try:
        assert "listening at" in first.stderr.readline()
        assert (sock.stat().st_mode & 0o777) & 0o077 == 0  # only its user can connect
        second = subprocess.run([sys.executable, "-m", "iisan.cli", "worker", "--socket", str(sock)], env=env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and f"another worker already listens at {sock}" in second.stderr
    finally:
        first.terminate()
        first.terminate()  # a second SIGTERM during the cleanup changes nothing
        assert first.wait(timeout=30) == 0
    assert not sock.exists() and "Traceback" not in first.stderr.read()


@pytest.mark.slow
def test_worker_refuses_when_its_children_could_not_start_cuda(tmp_path):
    """A worker whose imports asked the CUDA driver anything could not serve GPU jobs (torch marks
    its forked children unable to start CUDA): it refuses to start, and a workflow's jobs then run
    on their own. A site module stands in for such a library (this CPU has no CUDA)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nimport torch\n"
        "os.register_at_fork(after_in_child=lambda: setattr(torch.cuda, '_is_in_bad_fork', lambda: True))\n")
    e = env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(SRC), str(TESTS)]))
    sock = tmp_path / "w.sock"
    alone = subprocess.run([sys.executable, "-m", "iisan.cli", "worker", "--socket", str(sock)], env=e,
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1 and "asked the CUDA driver" in alone.stderr and not sock.exists()
    code = ("import os; from iisan.pipeline import worker; p = worker.start_for_workflow(True, local=True); "
            "print(p, os.environ.get(worker.ENV))")
    done = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "None"]  # no worker, no IISAN_WORKER: jobs run in their own processes
    assert "the worker did not start" in done.stderr and "asked the CUDA driver" in done.stderr


@pytest.mark.slow
def test_worker_refuses_when_an_import_started_a_thread(tmp_path):
    """A thread started while preloading (inductor's compile pool, polars' jemalloc) would be
    missing in each forked job, with whatever locks it held: the worker refuses to start."""
    (tmp_path / "starts_thread.py").write_text("import threading, time\n"
                                               "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    sock = tmp_path / "w.sock"
    done = subprocess.run([sys.executable, "-m", "iisan.cli", "worker", "--socket", str(sock), "--preload", "starts_thread"],
                          env=env(PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), str(tmp_path)])),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "1 more threads after importing" in done.stderr and not sock.exists()


@pytest.mark.slow
def test_a_worker_started_by_snakemake_does_not_outlive_it(tmp_path):
    """`--exit-with-parent` (how start_for_workflow starts one): Snakemake killed outright, the
    worker stops by itself and removes its socket."""
    sock = tmp_path / "w.sock"
    starter = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-m', 'iisan.cli', 'worker', "
               "'--socket', sys.argv[1], '--exit-with-parent']); print(p.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", starter, str(sock)], env=env(), stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    for _ in range(1200):
        if sock.exists():
            break
        time.sleep(0.05)
    assert sock.exists()
    parent.kill()
    parent.wait()
    assert gone(pid, 30) and not sock.exists()


@pytest.mark.slow
def test_a_workflow_train_job_through_the_worker_equals_its_own_run(tiny_workflow, tmp_path):
    """A train job of the tiny workflow, forced again with `worker: true` (Snakemake starts a worker
    for the run and stops it): the job process only waits (it never imports torch) and the metrics
    equal those of the job run on its own."""
    from conftest import SNAKEMAKE
    from fault_suite import CONFIG, _strip

    wd = tmp_path / "wd"  # a copy (hard links: Snakemake replaces what it rewrites) of the finished workflow
    shutil.copytree(tiny_workflow, wd, copy_function=os.link, ignore=shutil.ignore_patterns(".snakemake"))
    rel = sorted((wd / "results" / "runs").rglob("metrics.json"))[0].relative_to(wd)
    res = subprocess.run(SNAKEMAKE + ["--cores", "2", *CONFIG, "--config", f"mirror={wd / 'mirror'}", "worker=true",
                                      "--forcerun", str(rel), "--", str(rel)], cwd=wd, env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    listening = [line for line in res.stderr.splitlines() if "listening at" in line]
    assert len(listening) == 1, res.stderr[-3000:]
    assert "iisan: " not in res.stderr, res.stderr[-3000:]  # nothing ran elsewhere
    assert not Path(listening[0].split("listening at ")[1].split(" ")[0]).exists()  # stopped with the run
    assert _strip(json.loads((wd / rel).read_text())) == _strip(json.loads((tiny_workflow / rel).read_text()))
    run = rel.parent.relative_to("results/runs")
    bench = wd / "results" / "benchmarks" / "train" / run.parent / f"{run.name}.tsv"
    rss_mb = float(bench.read_text().splitlines()[1].split("\t")[2])
    assert rss_mb < 150, f"the job process itself used {rss_mb} MB: it ran the job"
