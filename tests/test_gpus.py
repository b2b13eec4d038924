"""Several GPUs in one machine (iisan.gpus, iisan.schedule): each local GPU job takes cards of its
own from a machine-wide pool of lock files, on simulated machines (IISAN_GPUS); and `iisan plan
--gpus N` schedules the budget's jobs on N cards."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from iisan import gpus, plan
from iisan.gpus import claim, for_job
from iisan.schedule import wall_seconds

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
FORK = multiprocessing.get_context("fork")


def cards(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def hold(folder, n_cards, k, seconds, start, results):
    """One job: wait for the start, take k cards, hold them `seconds`, say which and when."""
    start.wait()
    with claim(k, cards(n_cards), folder, label="test", poll=0.02) as c:
        t0 = time.monotonic()
        time.sleep(seconds)
        results.put((c.cards, t0, time.monotonic()))


def run_jobs(folder, n_cards, ks, seconds):
    start, results = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=hold, args=(folder, n_cards, k, seconds, start, results)) for k in ks]
    for p in procs:
        p.start()
    start.set()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return out


def overlap(a, b) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def test_n_jobs_on_n_cards_never_share_one(tmp_path):
    out = run_jobs(tmp_path, 4, [1, 1, 1, 1], 1.0)
    assert sorted(c for got, _, _ in out for c in got) == cards(4)
    assert all(overlap(a, b) for a in out for b in out)  # all four ran at once


def test_more_jobs_than_cards_wait_rather_than_share(tmp_path):
    out = run_jobs(tmp_path, 2, [1] * 5, 0.3)
    assert len(out) == 5
    for i, a in enumerate(out):
        for b in out[i + 1:]:
            if overlap(a, b):
                assert not set(a[0]) & set(b[0]), (a, b)
    # never more than two at once: at each job's start, at most two jobs hold cards
    for a in out:
        assert sum(b[1] <= a[1] < b[2] for b in out) <= 2


def test_a_two_gpu_job_gets_two_adjacent_cards(tmp_path):
    one = claim(1, cards(4), tmp_path)
    two = claim(2, cards(4), tmp_path)
    other = claim(1, cards(4), tmp_path)
    # one-card jobs fill from the bottom, several-card jobs from the top
    assert (one.cards, two.cards, other.cards) == (("0",), ("2", "3"), ("1",))
    with pytest.raises(TimeoutError):
        claim(1, cards(4), tmp_path, poll=0.01, timeout=0.1)
    two.release()
    with claim(2, cards(4), tmp_path, timeout=1) as again:
        assert again.cards == ("2", "3")
    # cards 0 and 2 held, 1 and 3 free: no two adjacent free cards, so any two free ones
    other.release()
    middle = claim(1, cards(4), tmp_path, label="x")
    assert middle.cards == ("1",)
    third = claim(1, cards(4), tmp_path)
    assert third.cards == ("2",)
    middle.release()
    with claim(2, cards(4), tmp_path, timeout=1) as apart:
        assert apart.cards == ("1", "3")
    one.release()
    third.release()


def test_several_card_jobs_and_one_card_jobs_share_a_machine(tmp_path):
    out = run_jobs(tmp_path, 3, [2, 1, 2, 1, 1], 0.2)
    assert sorted(len(got) for got, _, _ in out) == [1, 1, 1, 2, 2]
    # (adjacent cards where two adjacent ones are free, which depends on the jobs' timing here:
    # test_a_two_gpu_job_gets_two_adjacent_cards checks the choice itself)
    for i, a in enumerate(out):
        for b in out[i + 1:]:
            if overlap(a, b):
                assert not set(a[0]) & set(b[0]), (a, b)


HOLDER = """
import sys, time
from iisan.gpus import claim
c = claim(int(sys.argv[2]), [str(i) for i in range(int(sys.argv[3]))], sys.argv[1], label="holder")
print(",".join(c.cards), flush=True)
time.sleep(600)
"""


def test_a_killed_jobs_cards_are_free_again(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "2", "2"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0,1"
        with pytest.raises(TimeoutError):
            claim(1, cards(2), tmp_path, poll=0.01, timeout=0.2)
        assert "holder" in (tmp_path / "card-0.lock").read_text()  # who holds it, for the waiting message
    finally:
        proc.kill()
        proc.wait()
    # no clean-up of any kind: the kernel dropped the dead process's locks
    assert claim(2, cards(2), tmp_path, timeout=5).cards == ("0", "1")


def test_a_waiting_job_says_which_cards_are_busy(tmp_path, caplog):
    held = claim(1, cards(1), tmp_path, label="train logs/a.log")
    caplog.set_level("INFO", logger="iisan.gpus")
    with pytest.raises(TimeoutError):
        claim(1, cards(1), tmp_path, poll=0.01, timeout=0.1)
    assert f"busy: 0 (pid {os.getpid()} train logs/a.log)" in caplog.text
    held.release()


def test_a_job_takes_its_cards_within_the_visible_ones(tmp_path):
    base = {gpus.LOCKS_ENV: str(tmp_path), gpus.COUNT_ENV: "3"}
    assert gpus.visible(base) == cards(3)
    assert gpus.visible({"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2,-1,3"}) == ["GPU-a1", "GPU-b2"]
    # a job asking no GPU is left alone
    env = dict(base)
    assert for_job(0, env=env) is None and "CUDA_VISIBLE_DEVICES" not in env
    first, second = dict(base), dict(base)
    a, b = for_job(1, env=first), for_job(1, env=second)
    assert (first["CUDA_VISIBLE_DEVICES"], second["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    # CUDA_VISIBLE_DEVICES already set (by the user): narrowed within it
    narrowed = dict(base, CUDA_VISIBLE_DEVICES="1,2")
    c = for_job(1, env=narrowed)
    assert narrowed["CUDA_VISIBLE_DEVICES"] == "2"  # 1 is taken
    # more than the machine has: all of it
    for h in (a, b, c):
        h.release()
    everything = dict(base)
    with for_job(5, env=everything):
        assert everything["CUDA_VISIBLE_DEVICES"] == "0,1,2"


def test_under_slurm_the_allocation_is_the_jobs_cards(tmp_path):
    base = {gpus.LOCKS_ENV: str(tmp_path), gpus.COUNT_ENV: "8", "SLURM_JOB_ID": "42"}
    for env in (dict(base), dict(base, CUDA_VISIBLE_DEVICES="3"), dict(base, CUDA_VISIBLE_DEVICES="3,5")):
        before = dict(env)
        asked = 2 if "," in env.get("CUDA_VISIBLE_DEVICES", "") else 1
        assert for_job(asked, env=env) is None and env == before
    # Snakemake run locally inside an allocation of four cards: pooled per allocation
    inside = dict(base, CUDA_VISIBLE_DEVICES="4,5,6,7")
    with for_job(1, env=inside):
        assert inside["CUDA_VISIBLE_DEVICES"] == "4"
        assert (tmp_path / "slurm-42" / "card-4.lock").exists()


JOB = """
import os, sys, time
from types import SimpleNamespace
from iisan.jobs import job

snakemake = SimpleNamespace(log=[sys.argv[1]], threads=0, rule="train", resources=SimpleNamespace(gpu=int(sys.argv[2])))
with job(snakemake):
    print("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"), time.monotonic(), flush=True)
    time.sleep(float(sys.argv[3]))
    print("done", time.monotonic(), flush=True)
"""


def job_logs(tmp_path, asked, seconds, n, **extra):
    env = dict(os.environ, PYTHONPATH=str(SRC), **{gpus.LOCKS_ENV: str(tmp_path / "locks")}, **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("SLURM_JOB_ID", None)
    logs = [tmp_path / f"job{i}.log" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-c", JOB, str(log), str(asked), str(seconds)], env=env) for log in logs]
    for p in procs:
        assert p.wait(timeout=120) == 0
    return [log.read_text() for log in logs]


@pytest.mark.slow
def test_workflow_jobs_take_their_own_cards(tmp_path):
    """iisan.jobs.job (every workflow script) takes the job's cards before its body runs."""
    logs = job_logs(tmp_path, 1, 2.0, 3, IISAN_GPUS="2")
    runs = []
    for text in logs:
        card, t0 = next(line.split()[1:3] for line in text.splitlines() if line.startswith("CUDA_VISIBLE_DEVICES"))
        runs.append(((card,), float(t0), float(next(line.split()[1] for line in text.splitlines() if line.startswith("done")))))
    assert {c for (c,), _, _ in runs} == {"0", "1"}
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            assert not overlap(a, b) or a[0] != b[0], runs
    waited = [text for text in logs if "waiting for 1 free GPU(s) of 2; busy: 0 (pid" in text]
    assert len(waited) == 1  # the third job waited for a card, and said so in its log


WORKER_JOB = """
import os, sys, time
from types import SimpleNamespace
from iisan.jobs import job

def run(log, marker, seconds):
    snakemake = SimpleNamespace(log=[log], threads=0, rule="train", resources=SimpleNamespace(gpu=1))
    with job(snakemake):
        with open(marker, "w") as fh:
            fh.write(f"{os.getpid()} {os.environ['CUDA_VISIBLE_DEVICES']}")
        time.sleep(float(seconds))
"""


def wait_for(path: Path, seconds: float = 60) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_the_warm_worker_gives_each_child_its_card(tmp_path):
    (tmp_path / "gpujob.py").write_text(WORKER_JOB)
    locks, sock = tmp_path / "locks", tmp_path / "w.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "IISAN_WORKER")}
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), str(tmp_path)]), IISAN_GPUS="2", IISAN_GPU_LOCKS=str(locks))
    serve = f"from pathlib import Path; from iisan.worker import serve; serve(Path({str(sock)!r}), preload=('gpujob', 'iisan.jobs'))"
    worker = subprocess.Popen([sys.executable, "-c", serve], env=env, stderr=subprocess.PIPE, text=True)
    jobs = []
    try:
        assert "listening at" in worker.stderr.readline()
        for i, seconds in enumerate((600, 600)):
            code = f"import sys; from iisan.worker import run; sys.exit(run('gpujob:run', {str(tmp_path / f'{i}.log')!r}, " \
                   f"{str(tmp_path / f'{i}.marker')!r}, {seconds!r}))"
            jobs.append(subprocess.Popen([sys.executable, "-c", code], env=dict(env, IISAN_WORKER=str(sock)), stderr=subprocess.PIPE,
                                         text=True))
        got = [wait_for(tmp_path / f"{i}.marker").split() for i in range(2)]
        assert sorted(card for _, card in got) == ["0", "1"]
        assert all(int(pid) != job.pid for (pid, _), job in zip(got, jobs))  # ran in the worker's children
        # the job process killed outright: its child ends, and the card is free again
        jobs[0].kill()
        jobs[0].wait()
        with claim(1, ["0", "1"], locks, poll=0.05, timeout=30) as freed:
            assert freed.cards == (got[0][1],)
        # stopped (SIGTERM to the job process, forwarded to its child): its card too
        jobs[1].terminate()
        assert jobs[1].wait(timeout=60) != 0
        with claim(2, ["0", "1"], locks, poll=0.05, timeout=30) as both:
            assert both.cards == ("0", "1")
    finally:
        for p in (*jobs, worker):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)


SNAKEFILE = """
import iisan.gpus

if workflow.local_exec and "gpu" not in workflow.global_resources:  # as workflow/rules/common.smk
    workflow.register_resource("gpu", iisan.gpus.machine_gpus())

rule all:
    input: expand("out/{i}.txt", i=range(4))

rule one:
    output: "out/{i}.txt"
    log: "logs/{i}.log"
    resources: gpu=1
    script: "job.py"
"""

SCRIPT = """
import os, time
from iisan.jobs import job

with job(snakemake):
    t0 = time.monotonic()
    time.sleep(1.5)
    with open(snakemake.output[0], "w") as fh:
        fh.write(f"{os.environ['CUDA_VISIBLE_DEVICES']} {t0} {time.monotonic()}")
"""


@pytest.mark.slow
def test_a_local_snakemake_run_uses_every_card_once(tmp_path):
    """Snakemake runs as many GPU jobs at once as the machine has cards (no `--resources gpu=`), each on its own."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "job.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "IISAN_WORKER")}
    env.update(PYTHONPATH=str(SRC), IISAN_GPUS="2", IISAN_GPU_LOCKS=str(tmp_path / "locks"))
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "4", "--quiet", "rules"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [(c, float(a), float(b)) for c, a, b in ((tmp_path / f"out/{i}.txt").read_text().split() for i in range(4))]
    assert sorted(c for c, _, _ in runs) == ["0", "0", "1", "1"]
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a[1] < b[2] and b[1] < a[2]:
                assert a[0] != b[0], runs
    assert all(sum(a[1] < b[2] and b[1] < a[2] for b in runs) <= 2 for a in runs)
    assert any(a[1] < b[2] and b[1] < a[2] for a in runs for b in runs if a is not b)  # two at once


# --- wall time on N cards (iisan plan --gpus N) ---------------------------------------------------

def job(name, hours, k=1, after=()):
    return SimpleNamespace(name=name, seconds=hours * 3600, gpus=k, after=frozenset(after))


def test_wall_time_of_a_list_schedule():
    h = 3600
    four = [job(f"j{i}", 1) for i in range(4)]
    assert [wall_seconds(four, n) / h for n in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert wall_seconds([job(f"j{i}", t) for i, t in enumerate([3, 3, 2, 2, 2])], 2) / h == 7  # longest first
    # a two-card job takes two cards
    mixed = [job("big", 1, 2), job("a", 1), job("b", 1)]
    assert [wall_seconds(mixed, n) / h for n in (2, 3, 4)] == [2, 2, 1]
    assert wall_seconds([job("standin", 1, 0), job("a", 1)], 1) / h == 1  # a job of no card runs beside
    assert wall_seconds(mixed, 1) / h == 3  # more cards asked than there are: all of them, as Snakemake gives
    # inputs first: b waits for a
    assert wall_seconds([job("a", 1), job("b", 1, after={"a"})], 2) / h == 2


def test_jobs_wait_for_the_gpu_jobs_upstream_in_the_dag(demo_graph):
    """A job waits for the nearest GPU jobs upstream of it in Snakemake's DAG, through CPU jobs: a
    cache of a caption field for its captions, a cached run for the full caches behind its
    pruned ones, a run with backbones in the loop for no GPU job."""
    from iisan.budget import Budget

    jobs = Budget(demo_graph.config).build(demo_graph).jobs
    caption_cache = next(j for j in jobs.values() if j.kind == "cache" and "caption" in j.name)
    assert caption_cache.after and all(jobs[a].kind == "caption" for a in caption_cache.after)
    cached = next(j for j in jobs.values() if j.kind == "train" and "/dropped/" in j.name and "@" in j.name)
    towers = cached.name.split("/")[3].split("+")
    assert cached.after == {plan.CACHE_ARRAY.format(dataset=cached.name.split("/")[2], field=t.split("@")[0], backbone=t.split("@")[1])
                            for t in towers}
    in_loop = next(j for j in jobs.values() if j.kind == "train" and j.name.endswith("/none/seed12345/metrics.json") and "@" in j.name)
    assert all(jobs[a].kind == "caption" for a in in_loop.after)
    assert wall_seconds(list(jobs.values()), 1000) >= caption_cache.seconds + jobs[next(iter(caption_cache.after))].seconds


@pytest.mark.slow
def test_iisan_plan_prints_the_wall_time_on_n_gpus():
    out = subprocess.run([sys.executable, "-m", "iisan.cli", "plan", "--configfile", "config/paper.yaml", "--gpus", "8"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(SRC)), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("wall time on 8 GPUs: "))
    wall, total = float(line.split()[5]), float(line.split()[9].rstrip(")"))
    gpu_hours = float(next(line for line in out.stdout.splitlines() if line.startswith("total")).split()[6])
    assert total == gpu_hours and total / 8 < wall < total  # the 34B video captions (two cards, ~105 h) bound it
