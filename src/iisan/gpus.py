"""One card per GPU job on a machine with several GPUs: a machine-wide pool of lock files.

Snakemake counts the `gpu` resource but does not say which card a local job should use, so
without this every job would open cuda:0. Before CUDA starts, a local job (iisan.jobs.job, also in
a warm worker's forked child: iisan.worker) takes as many cards as its `gpu` resource asks and
narrows CUDA_VISIBLE_DEVICES to them:

- the pool is one lock file per card (`card-<id>.lock`) in $IISAN_GPU_LOCKS, else
  <tmp>/iisan-gpus-<uid>, shared by every run of this user on this machine (point IISAN_GPU_LOCKS
  at one folder, mode 1777, to share the cards with other users);
- a card is taken with fcntl.flock on its file, held by the job's process for its lifetime: the
  kernel drops the lock when the process ends, however it ends (a killed job's card is free again
  at once, with no stale file to clean up); the file names the last holder, for the waiting message;
- the cards are those CUDA_VISIBLE_DEVICES lists when it is set (a job narrows within it), else
  0..n-1 for the n GPUs of the machine (NVML through pynvml / nvidia-ml-py, else `nvidia-smi -L`;
  $IISAN_GPUS overrides the count, which is how the tests simulate a machine);
- a job asking k > 1 cards (a 70B cache, the 34B captioner) takes k adjacent ones (one-card jobs
  fill the pool from card 0, several-card jobs from the top, which keeps adjacent cards free), or
  any k free ones when no adjacent k are free;
- when too few cards are free (another run, another user's jobs, `--resources gpu=` above the
  machine's count) the job waits, polling every POLL_S seconds and saying in its log which cards
  are busy and who holds them; it never shares a card.

Under SLURM (SLURM_JOB_ID set) the scheduler gives each job its own cards: nothing changes, unless
the allocation lists more cards than the job asks (a local Snakemake run inside `salloc`), which are
then pooled per allocation (a folder per SLURM job id, as the ids of different allocations name
different physical cards). A job asking no GPU (`gpu: 0`, CPU runs) is left alone.

Card ids are compared as written: runs that name the same card as "2" and by its UUID do not see
each other's locks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNT_ENV = "IISAN_GPUS"  # the machine's GPU count, instead of asking NVML (tests simulate machines with it)
LOCKS_ENV = "IISAN_GPU_LOCKS"  # the folder of the lock files
POLL_S = 2.0  # seconds between tries while waiting for cards
SAY_EVERY_S = 60.0  # seconds between waiting messages

log = logging.getLogger(__name__)


# --- which cards there are ----------------------------------------------------------------------

def detect(env=None, use_torch: bool = False) -> int:
    """The number of GPUs of this machine, regardless of CUDA_VISIBLE_DEVICES: $IISAN_GPUS (in
    `env`, default os.environ), else NVML, else `nvidia-smi -L`, else (with use_torch, where torch
    may start CUDA: not in a job) torch.cuda.device_count(); 0 when none of them finds one."""
    env = os.environ if env is None else env
    if env.get(COUNT_ENV, "").strip():
        return int(env[COUNT_ENV])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no bindings, no driver: ask nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    if use_torch:
        try:
            import torch

            return int(torch.cuda.device_count())
        except Exception:  # noqa: BLE001
            pass
    return 0


def visible(env=None, use_torch: bool = False) -> list[str]:
    """The cards a process with environment `env` (default os.environ) may use, as
    CUDA_VISIBLE_DEVICES names them: its entries when it is set (up to the first empty or
    negative one, where CUDA stops reading), else "0" .. "n-1"."""
    env = os.environ if env is None else env
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(detect(env, use_torch))]
    cards = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        cards.append(entry)
    return cards


def machine_gpus() -> int:
    """How many GPU jobs' cards this machine has for a local run (the Snakefile's default for the
    `gpu` resource): the cards visible to Snakemake ($IISAN_GPUS, NVML or nvidia-smi: planning
    imports no torch), at least 1 (a CPU run's jobs ask for none)."""
    return max(len(visible()), 1)


def lock_folder(env=None) -> Path:
    """$IISAN_GPU_LOCKS, else <tmp>/iisan-gpus-<uid>; under SLURM a folder per allocation in it."""
    env = os.environ if env is None else env
    folder = Path(env.get(LOCKS_ENV) or Path(tempfile.gettempdir()) / f"iisan-gpus-{os.getuid()}")
    if env.get("SLURM_JOB_ID"):
        folder = folder / f"slurm-{env['SLURM_JOB_ID']}"
    return folder


# --- taking cards -------------------------------------------------------------------------------

class Claim:
    """Cards held by this process (its flocks on their lock files) until release() or its end."""

    def __init__(self, cards: list[str], fds: list[int]):
        self.cards, self._fds = tuple(cards), fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the last descriptor drops the flock
        self._fds = []

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim({','.join(self.cards)})"


def _lock_path(folder: Path, card: str) -> Path:
    return folder / f"card-{re.sub(r'[^A-Za-z0-9_.-]', '_', card)}.lock"


def _open(path: Path) -> tuple[int, bool]:
    """A descriptor of the lock file (made if missing) and whether it is writable (another
    user's file in a shared folder can be locked, not written)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:
        return os.open(path, os.O_RDONLY), False


def _try_lock(path: Path, label: str) -> int | None:
    """The locked file's descriptor, or None when another process holds the card."""
    fd, writable = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {label}".strip().encode() + b"\n", 0)
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def _preferences(n: int, k: int) -> list[list[int]]:
    """Card index sets to try, best first: one card from the bottom; k adjacent ones from the top."""
    if k == 1:
        return [[i] for i in range(n)]
    return [list(range(i, i + k)) for i in range(n - k, -1, -1)]


def _try_claim(folder: Path, cards: list[str], k: int, label: str) -> Claim | None:
    paths = [_lock_path(folder, c) for c in cards]
    for chosen in [*_preferences(len(cards), k), None]:  # None: any k free cards
        fds, got = [], []
        for i in chosen if chosen is not None else range(len(cards)):
            fd = _try_lock(paths[i], label)
            if fd is None:
                if chosen is not None:
                    break
                continue
            fds.append(fd)
            got.append(i)
            if len(got) == k:
                break
        if len(got) == k:
            if chosen is None and k > 1:
                log.info("no %d adjacent free GPUs: took cards %s", k, ",".join(cards[i] for i in got))
            return Claim([cards[i] for i in got], fds)
        for fd in fds:
            os.close(fd)
    return None


def claim(k: int, cards: list[str], folder: Path | None = None, label: str = "", poll: float = POLL_S,
          timeout: float | None = None) -> Claim:
    """Take `k` of `cards` (CUDA_VISIBLE_DEVICES entries) from the pool in `folder` (default
    lock_folder()), waiting while fewer are free; TimeoutError after `timeout` seconds, if given.
    `label` (the job) is written into the lock files for other jobs' waiting messages."""
    if not 0 < k <= len(cards):
        raise ValueError(f"cannot take {k} of {len(cards)} GPUs ({','.join(cards) or 'none'})")
    folder = Path(folder or lock_folder())
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    start = said = time.monotonic()
    first = True
    while True:
        got = _try_claim(folder, cards, k, label)
        if got is not None:
            if not first:
                log.info("took GPU(s) %s after %.0f s", ",".join(got.cards), time.monotonic() - start)
            return got
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            raise TimeoutError(f"no {k} free GPUs of {','.join(cards)} within {timeout:g} s")
        if first or now - said >= SAY_EVERY_S:
            busy = [f"{c} ({_holder(_lock_path(folder, c))})" for c in cards if _busy(_lock_path(folder, c))]
            log.info("waiting for %d free GPU(s) of %d; busy: %s (locks in %s)", k, len(cards), "; ".join(busy) or "none", folder)
            said, first = now, False
        time.sleep(poll * random.uniform(0.75, 1.25))  # jitter: jobs started together do not retry together


def _busy(path: Path) -> bool:
    """Whether a process holds the card (for the waiting message: a shared lock, let go at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def for_job(asked: int, label: str = "", env=None, poll: float = POLL_S) -> Claim | None:
    """Take the cards of a local job asking `asked` GPUs and narrow CUDA_VISIBLE_DEVICES in `env`
    (default os.environ) to them; must run before CUDA starts in this process. None, and `env`
    unchanged, for a job asking none, or a SLURM job whose allocation already is its cards."""
    env = os.environ if env is None else env
    if asked <= 0:
        return None
    if env.get("SLURM_JOB_ID") and ("CUDA_VISIBLE_DEVICES" not in env or len(visible(env)) <= asked):
        return None
    cards = visible(env)
    if not cards:
        log.warning("the job asks for %d GPU(s) but this machine shows none", asked)
        return None
    if asked > len(cards):
        log.warning("the job asks for %d GPUs, this machine has %d: it takes them all", asked, len(cards))
        asked = len(cards)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("CUDA started before the job took its GPUs: CUDA_VISIBLE_DEVICES cannot narrow it any more")
    got = claim(asked, cards, lock_folder(env), label=label, poll=poll)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(got.cards)
    log.info("GPU(s) %s of %s (CUDA_VISIBLE_DEVICES=%s)", ",".join(got.cards), ",".join(cards), env["CUDA_VISIBLE_DEVICES"])
    return got
