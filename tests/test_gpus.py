"""Several GPUs in one machine (iisan.pipeline.gpus, iisan.pipeline.schedule): each local GPU job takes cards of its
own from a machine-wide pool of lock files, on simulated machines (IISAN_GPUS); and `iisan plan
--gpus N` schedules the budget's jobs on N cards."""

import errno
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from iisan.pipeline import gpus, plan
from iisan.pipeline.gpus import claim, for_job
from iisan.pipeline.schedule import wall_seconds

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
from iisan.pipeline.gpus import claim
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
    caplog.set_level("INFO", logger="iisan.pipeline.gpus")
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
        assert (tmp_path / socket.gethostname() / "slurm-42" / "card-4.lock").exists()


# --- one pool per machine, for every user ---------------------------------------------------------

def test_the_pool_is_one_folder_per_machine_whatever_the_tmpdir(monkeypatch):
    host = socket.gethostname()
    monkeypatch.setattr(tempfile, "tempdir", "/scratch/job-tmp")  # what a job's own TMPDIR makes of it
    assert gpus.DEFAULT_BASE == Path("/tmp/iisan-gpus")
    for env in ({}, {"TMPDIR": "/scratch/job1"}, {"TMPDIR": "/scratch/job2"}):
        assert gpus.lock_folder(env) == Path("/tmp/iisan-gpus") / host
    # a base on a shared filesystem still has a folder per machine
    assert gpus.lock_folder({gpus.LOCKS_ENV: "/nfs/locks"}) == Path("/nfs/locks") / host
    assert gpus.lock_folder({"SLURM_JOB_ID": "42"}) == Path("/tmp/iisan-gpus") / host / "slurm-42"
    monkeypatch.setattr(gpus.socket, "gethostname", lambda: "node/7 a")
    assert gpus.lock_folder({}) == Path("/tmp/iisan-gpus/node_7_a")


TMPDIR_JOB = """
import os, sys, tempfile
from pathlib import Path
from iisan.pipeline import gpus

gpus.DEFAULT_BASE = Path(sys.argv[1])  # the machine's default base, moved into the test's folder
held = gpus.for_job(1, label="job")
print(os.environ["CUDA_VISIBLE_DEVICES"], gpus.lock_folder(), tempfile.gettempdir(), flush=True)
sys.stdin.read()  # holds the card until the test closes stdin
"""


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "IISAN_WORKER", gpus.LOCKS_ENV)}
    return dict(env, PYTHONPATH=str(SRC), **extra)


def test_jobs_with_their_own_tmpdir_take_different_cards(tmp_path):
    """Snakemake gives each job its own TMPDIR: two jobs (real processes, no $IISAN_GPU_LOCKS) on a
    machine of two cards still share one pool, so each gets its own card."""
    jobs, got = [], []
    try:
        for i in range(2):
            (tmp_path / f"tmp{i}").mkdir()
            env = clean_env(IISAN_GPUS="2", TMPDIR=str(tmp_path / f"tmp{i}"))
            jobs.append(subprocess.Popen([sys.executable, "-c", TMPDIR_JOB, str(tmp_path / "base")], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True))
            got.append(jobs[-1].stdout.readline().split())
    finally:
        for p in jobs:
            p.stdin.close()
            p.wait(timeout=30)
    assert [p.returncode for p in jobs] == [0, 0]
    assert [card for card, _, _ in got] == ["0", "1"]
    assert {folder for _, folder, _ in got} == {str(tmp_path / "base" / socket.gethostname())}
    assert [tmp for _, _, tmp in got] == [str(tmp_path / "tmp0"), str(tmp_path / "tmp1")]  # their TMPDIR did differ


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_pool_is_open_to_every_user_whatever_the_umask(tmp_path):
    base = tmp_path / "base"
    folder = gpus.lock_folder({gpus.LOCKS_ENV: str(base)})
    old = os.umask(0o077)
    try:
        with claim(1, cards(1), folder):
            with pytest.raises(TimeoutError):  # a waiter: its ticket, the queue's gate
                claim(1, cards(1), folder, poll=0.01, timeout=0.05)
    finally:
        os.umask(old)
    assert [mode(f) for f in (base, folder, folder / "queue")] == [0o1777] * 3
    assert [mode(f) for f in (folder / "card-0.lock", folder / "queue" / ".gate")] == [0o666] * 2
    assert not list((folder / "queue").glob("*.ticket"))  # the waiter left the queue


@pytest.fixture
def shared_tmp():
    """A folder every user of the machine can reach (pytest's tmp_path is root's own), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="iisan-gpus-test-"))
    try:
        if not all(mode(p) & stat.S_IXOTH for p in path.parents):
            pytest.skip(f"{path.parent} is not reachable by other users")
        os.chmod(path, 0o1777)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# the jobs of another user: root drops to `uid` with umask 077 once Python and iisan.pipeline.gpus are loaded
# (a preexec_fn would drop it before exec, where the interpreter may lie in a folder the user cannot
# reach, such as /root)
AS_USER = """
import logging, os, sys
from iisan.pipeline import gpus

uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
os.umask(0o077)
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
"""

USER_JOB = AS_USER + """
held = gpus.for_job(1, label=f"uid {uid}", poll=0.05)
print(os.getuid(), os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
sys.stdin.read()  # holds the card until the test closes stdin
"""

FIRST_UID, SECOND_UID = 65534, 65533  # nobody, and a user of no name: neither is root


def as_user(script: str, uid: int, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, str(uid), *map(str, args)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs jobs as two other users (os.setuid), which needs root")


@needs_root
def test_another_users_job_waits_for_the_card_instead_of_failing(shared_tmp):
    """Two users, each under umask 077, on a machine of one card: the second user's job waits for
    the card the first holds (in the pool the first one made), then takes it."""
    base = shared_tmp / "pool"
    env = clean_env(IISAN_GPUS="1", IISAN_GPU_LOCKS=str(base))
    first = as_user(USER_JOB, FIRST_UID, env=env)
    procs = [first]
    watchdog = threading.Timer(60, lambda: [p.kill() for p in procs])
    watchdog.start()
    try:
        assert first.stdout.readline().split() == [str(FIRST_UID), "0"], first.stderr.read()
        folder = base / socket.gethostname()
        assert base.stat().st_uid == FIRST_UID and (folder / "card-0.lock").stat().st_uid == FIRST_UID
        assert [mode(f) for f in (base, folder, folder / "queue")] == [0o1777] * 3 and mode(folder / "card-0.lock") == 0o666
        second = as_user(USER_JOB, SECOND_UID, env=env)
        procs.append(second)
        said = []
        for line in second.stderr:
            said.append(line)
            if "waiting for 1 free GPU(s) of 1; busy: 0 (pid" in line:
                break
        else:
            pytest.fail(f"the second user's job ended (status {second.wait()}) instead of waiting: {''.join(said)}")
        assert f"uid {FIRST_UID}" in said[-1] and second.poll() is None
        first.stdin.close()
        assert first.wait(timeout=30) == 0
        assert second.stdout.readline().split() == [str(SECOND_UID), "0"]
        assert f"uid {SECOND_UID}" in (folder / "card-0.lock").read_text()  # it could note itself in the first one's file
        second.stdin.close()
        assert second.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


READ_ONLY_JOB = AS_USER + """
held = gpus.claim(1, ["0"], sys.argv[2], label="reader")
print(",".join(held.cards), flush=True)
sys.stdin.read()
"""


def test_a_lock_file_one_cannot_write_is_still_locked(shared_tmp):
    """A card's file another user made read-only (or one made before the pool's modes) is locked
    through a read-only descriptor; its holder note stays as it was."""
    folder = shared_tmp / "pool"
    folder.mkdir(mode=0o1777)
    os.chmod(folder, 0o1777)
    card = folder / "card-0.lock"
    card.write_text("pid 1 someone\n")
    os.chmod(card, 0o444)
    if os.geteuid() == 0:  # root may write any file: the holder is another user
        holder = as_user(READ_ONLY_JOB, FIRST_UID, folder, env=clean_env())
        try:
            assert holder.stdout.readline().strip() == "0", holder.stderr.read()
            with pytest.raises(TimeoutError):
                claim(1, ["0"], folder, poll=0.01, timeout=0.1)
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
        assert holder.returncode == 0
    else:
        with claim(1, ["0"], folder, label="reader") as held:
            assert held.cards == ("0",)
            with pytest.raises(TimeoutError):
                claim(1, ["0"], folder, poll=0.01, timeout=0.1)
    assert card.read_text() == "pid 1 someone\n"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_stops_the_job_naming_the_folder(tmp_path, monkeypatch, code):
    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(gpus.fcntl, "flock", no_locks)  # as on an NFS mount without locking
    env = {gpus.LOCKS_ENV: str(tmp_path / "nfs"), gpus.COUNT_ENV: "2"}
    with pytest.raises(gpus.LockUnsupported) as raised:
        for_job(1, env=env)
    message = str(raised.value)
    assert raised.value.errno == code and errno.errorcode[code] in message
    assert str(gpus.lock_folder(env)) in message and "$IISAN_GPU_LOCKS" in message
    assert "CUDA_VISIBLE_DEVICES" not in env


# --- waiting in line ------------------------------------------------------------------------------

def wait_until(check, seconds: float = 20):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError("never happened")


def in_thread(*args, **kwargs):
    """claim(*args, **kwargs) in a thread (its own descriptors: its flocks are another holder's);
    the thread and a list that gets the Claim."""
    got = []
    thread = threading.Thread(target=lambda: got.append(claim(*args, **kwargs)))
    thread.start()
    return thread, got


def test_a_waiting_two_card_job_does_not_starve_behind_one_card_jobs(tmp_path, caplog):
    caplog.set_level("INFO", logger="iisan.pipeline.gpus")
    first = claim(1, cards(2), tmp_path, label="first")
    thread, big = in_thread(2, cards(2), tmp_path, label="big", poll=0.02)
    try:
        assert wait_until(lambda: gpus.waiting(tmp_path)) == [f"2 GPU(s), pid {os.getpid()} big"]
        # a stream of one-card jobs: card 1 is free, but each waits behind the two-card job
        for _ in range(3):
            with pytest.raises(TimeoutError):
                claim(1, cards(2), tmp_path, label="small", poll=0.01, timeout=0.05)
        assert "waiting before it: 2 GPU(s), pid" in caplog.text
        assert gpus.waiting(tmp_path) == [f"2 GPU(s), pid {os.getpid()} big"]  # the one-card jobs left the line
    finally:
        first.release()
        thread.join(timeout=20)
    assert big[0].cards == ("0", "1")
    assert gpus.waiting(tmp_path) == []
    big[0].release()
    assert claim(1, cards(2), tmp_path, timeout=1).cards == ("0",)


def test_jobs_wait_in_line_in_order_of_arrival(tmp_path):
    held = claim(2, cards(2), tmp_path)
    one, got_one = in_thread(1, cards(2), tmp_path, label="one", poll=0.02)
    wait_until(lambda: len(gpus.waiting(tmp_path)) == 1)
    two, got_two = in_thread(2, cards(2), tmp_path, label="two", poll=0.02)
    wait_until(lambda: len(gpus.waiting(tmp_path)) == 2)
    assert [w.split()[-1] for w in gpus.waiting(tmp_path)] == ["one", "two"]
    held.release()
    one.join(timeout=20)
    assert got_one[0].cards == ("0",)
    time.sleep(0.1)  # card 1 is free, but not two of them: the two-card job still waits
    assert not got_two and gpus.waiting(tmp_path)[0].endswith("two")
    got_one[0].release()
    two.join(timeout=20)
    assert got_two[0].cards == ("0", "1")
    got_two[0].release()


def test_jobs_on_other_cards_do_not_wait_for_a_waiting_job(tmp_path):
    """Runs that split the machine (CUDA_VISIBLE_DEVICES=0,1 and 2,3) share the pool, not the line."""
    held = claim(1, ["0", "1"], tmp_path)
    thread, big = in_thread(2, ["0", "1"], tmp_path, poll=0.02)
    try:
        wait_until(lambda: gpus.waiting(tmp_path))
        with claim(1, ["2", "3"], tmp_path, timeout=0.5) as other:
            assert other.cards == ("2",)
    finally:
        held.release()
        thread.join(timeout=20)
    assert big[0].cards == ("0", "1")
    big[0].release()


WAITER = """
import sys
from iisan.pipeline.gpus import claim

claim(int(sys.argv[2]), sys.argv[3].split(","), sys.argv[1], label="waiter", poll=0.05)
"""


def test_a_killed_waiter_leaves_nothing_that_blocks(tmp_path):
    held = claim(1, cards(2), tmp_path)
    waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(tmp_path), "2", "0,1"], env=clean_env())
    try:
        wait_until(lambda: gpus.waiting(tmp_path))
        with pytest.raises(TimeoutError):
            claim(1, cards(2), tmp_path, poll=0.01, timeout=0.05)
    finally:
        waiter.kill()
        waiter.wait()
    assert gpus.waiting(tmp_path) == [] and list((tmp_path / "queue").glob("*.ticket"))  # its ticket, unlocked
    assert claim(1, cards(2), tmp_path, timeout=0).cards == ("1",)
    with pytest.raises(TimeoutError):  # a waiter: taking its ticket deletes the dead one
        claim(1, cards(2), tmp_path, poll=0.01, timeout=0.05)
    assert not list((tmp_path / "queue").glob("*.ticket"))
    held.release()


JOB = """
import os, sys, time
from types import SimpleNamespace
from iisan.pipeline.jobs import job

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
    """iisan.pipeline.jobs.job (every workflow script) takes the job's cards before its body runs."""
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
from iisan.pipeline.jobs import job

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
    serve = (f"from pathlib import Path; from iisan.pipeline.worker import serve; "
             f"serve(Path({str(sock)!r}), preload=('gpujob', 'iisan.pipeline.jobs'))")
    worker = subprocess.Popen([sys.executable, "-c", serve], env=env, stderr=subprocess.PIPE, text=True)
    jobs = []
    try:
        assert "listening at" in worker.stderr.readline()
        for i, seconds in enumerate((600, 600)):
            code = f"import sys; from iisan.pipeline.worker import run; sys.exit(run('gpujob:run', {str(tmp_path / f'{i}.log')!r}, " \
                   f"{str(tmp_path / f'{i}.marker')!r}, {seconds!r}))"
            jobs.append(subprocess.Popen([sys.executable, "-c", code], env=dict(env, IISAN_WORKER=str(sock)), stderr=subprocess.PIPE,
                                         text=True))
        got = [wait_for(tmp_path / f"{i}.marker").split() for i in range(2)]
        assert sorted(card for _, card in got) == ["0", "1"]
        assert all(int(pid) != job.pid for (pid, _), job in zip(got, jobs))  # ran in the worker's children
        # the job process killed outright: its child ends, and the card is free again
        jobs[0].kill()
        jobs[0].wait()
        pool = gpus.lock_folder({gpus.LOCKS_ENV: str(locks)})
        with claim(1, ["0", "1"], pool, poll=0.05, timeout=30) as freed:
            assert freed.cards == (got[0][1],)
        # stopped (SIGTERM to the job process, forwarded to its child): its card too
        jobs[1].terminate()
        assert jobs[1].wait(timeout=60) != 0
        with claim(2, ["0", "1"], pool, poll=0.05, timeout=30) as both:
            assert both.cards == ("0", "1")
    finally:
        for p in (*jobs, worker):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)


SNAKEFILE = """
import iisan.pipeline.gpus

if workflow.local_exec and "gpu" not in workflow.global_resources:  # as workflow/rules/common.smk
    workflow.register_resource("gpu", iisan.pipeline.gpus.machine_gpus())

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
from iisan.pipeline.jobs import job

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
    from iisan.pipeline.budget import Budget

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
