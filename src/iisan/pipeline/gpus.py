"""One card per GPU job on a machine with several GPUs: a machine-wide pool of lock files.

Snakemake counts the `gpu` resource but does not say which card a local job should use, so
without this every job would open cuda:0. Before CUDA starts, a local job (iisan.pipeline.jobs.job, also in
a warm worker's forked child: iisan.pipeline.worker) takes as many cards as its `gpu` resource asks and
narrows CUDA_VISIBLE_DEVICES to them:

- the pool is one lock file per card (`card-<id>.lock`) in one folder per machine,
  <base>/<hostname>, shared by every run of every user of the machine: the cards are the
  machine's. The base is $IISAN_GPU_LOCKS, else DEFAULT_BASE (/tmp/iisan-gpus: a fixed path,
  never the job's TMPDIR, which Snakemake sets per job); the hostname keeps a base on a shared
  filesystem per machine. Every folder the pool makes is mode 1777 and every lock file 0666,
  whatever the umask, so that another user's job can lock them too (and waits for a busy card
  instead of failing); a lock file one cannot write is locked read-only (flock needs no write
  access), its holder note then stays as it was;
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
  machine's count) the job waits in line: it takes a ticket in the pool's `queue` folder (a file
  it holds a flock on, numbered in order of arrival), and a job that comes later and may use any
  of the same cards waits behind it, even when it asks fewer cards and enough are free for it. A
  job asking several cards thus gets them as soon as enough are free and does not starve behind a
  stream of one-card jobs (at the cost of cards left idle meanwhile); jobs whose cards do not
  overlap (CUDA_VISIBLE_DEVICES=0,1 and 2,3) do not wait for each other.
  A waiting job polls every POLL_S seconds and says in its log which cards are busy, who holds
  them and who waits before it; it never shares a card. A killed waiter's ticket is unlocked, so
  it no longer counts (and the next job that takes a ticket deletes it);
- a filesystem without flock (an NFS mount without locking: ENOLCK, EOPNOTSUPP) cannot keep two
  jobs off one card: the job stops with LockUnsupported, which names the folder, the error and
  $IISAN_GPU_LOCKS to point the pool at a local folder.

Under SLURM (SLURM_JOB_ID set) the scheduler gives each job its own cards: nothing changes, unless
the allocation lists more cards than the job asks (a local Snakemake run inside `salloc`), which are
then pooled per allocation (a folder slurm-<job id> in the machine's folder, as the ids of
different allocations name different physical cards). A job asking no GPU (`gpu: 0`, CPU runs) is
left alone.

Card ids are compared as written: runs that name the same card as "2" and by its UUID do not see
each other's locks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

COUNT_ENV = "IISAN_GPUS"  # the machine's GPU count, instead of asking NVML (tests simulate machines with it)
LOCKS_ENV = "IISAN_GPU_LOCKS"  # the base folder of the pools (one folder per machine in it)
DEFAULT_BASE = Path("/tmp/iisan-gpus")  # the base without $IISAN_GPU_LOCKS: one path for every job and user
FOLDER_MODE = 0o1777  # every user may add files, none may remove another's (sticky)
FILE_MODE = 0o666  # every user may lock (and note themselves in) a card's file
TICKET_MODE = 0o644  # every user may read a ticket (and test its lock)
QUEUE = "queue"  # the pool's subfolder of waiting jobs' tickets
GATE = ".gate"  # in the queue folder: locked while a ticket is numbered
POLL_S = 2.0  # seconds between tries while waiting for cards
SAY_EVERY_S = 60.0  # seconds between waiting messages
OPEN_PATIENCE_S = 2.0  # how long a folder or file another user has just made may stay closed to us (until its chmod)
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})  # flock unsupported here

log = logging.getLogger(__name__)


class LockUnsupported(OSError):
    """The pool's filesystem has no working flock (ENOLCK, EOPNOTSUPP: an NFS mount without locking):
    jobs could not keep each other off a card there."""


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
    """The pool of this machine: <$IISAN_GPU_LOCKS or DEFAULT_BASE>/<hostname>; under SLURM a
    folder slurm-<job id> in it per allocation. Neither TMPDIR nor the user changes it."""
    env = os.environ if env is None else env
    folder = Path(env.get(LOCKS_ENV) or DEFAULT_BASE) / _safe(socket.gethostname() or "localhost")
    if env.get("SLURM_JOB_ID"):
        folder = folder / f"slurm-{_safe(env['SLURM_JOB_ID'])}"
    return folder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --- the pool's folders and files ---------------------------------------------------------------

def _make_folder(path: Path) -> None:
    """Make `path` and its missing parents, each mode FOLDER_MODE whatever the umask; a folder
    that exists stays as it is."""
    try:
        os.mkdir(path, FOLDER_MODE)
    except FileExistsError:
        return
    except FileNotFoundError:
        _make_folder(path.parent)
        try:
            os.mkdir(path, FOLDER_MODE)
        except FileExistsError:
            return
    os.chmod(path, FOLDER_MODE)  # mkdir's mode is narrowed by the umask


def _make_pool(folder: Path) -> None:
    """Make the pool's folders (the queue's too); a folder another user is making may be closed
    to us until its chmod: PermissionError after OPEN_PATIENCE_S."""
    end = time.monotonic() + OPEN_PATIENCE_S
    while True:
        try:
            return _make_folder(folder / QUEUE)
        except PermissionError:
            if time.monotonic() >= end:
                raise
            time.sleep(0.01)


def _open(path: Path) -> tuple[int, bool]:
    """A descriptor of the lock file (made FILE_MODE if missing) and whether it is writable (a
    file another user made narrower, or one in a folder we may not write in, is opened read-only:
    flock works on it all the same). Symbolic links are not followed. A file or folder another
    user is making may be closed to us until its chmod: PermissionError after OPEN_PATIENCE_S."""
    end = time.monotonic() + OPEN_PATIENCE_S
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        except (FileExistsError, PermissionError, FileNotFoundError):
            pass
        else:
            os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is narrowed by the umask
            return fd, True
        try:
            return os.open(path, os.O_RDWR | os.O_NOFOLLOW), True
        except PermissionError:
            pass
        except FileNotFoundError:
            if time.monotonic() >= end:
                raise
            time.sleep(0.01)
            continue
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW), False
        except (PermissionError, FileNotFoundError):
            if time.monotonic() >= end:
                raise
        time.sleep(0.01)


def _flock(fd: int, operation: int, folder: Path) -> None:
    """fcntl.flock; LockUnsupported where the filesystem has no locks (BlockingIOError, for a lock
    held elsewhere with LOCK_NB, passes through)."""
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        name = errno.errorcode.get(e.errno, str(e.errno))
        raise LockUnsupported(e.errno, f"cannot lock the GPU lock files in {folder}: flock fails with {name} ({e.strerror}): "
                                       f"this filesystem does not support file locks (an NFS mount without locking?), so jobs "
                                       f"could share a card; set ${LOCKS_ENV} to a folder on a local filesystem "
                                       f"(by default the pool is in {DEFAULT_BASE})") from e


def _unusable(folder: Path, e: OSError) -> OSError:
    """The error of a pool folder this process may not use (another user's private folder)."""
    where = f" ({e.filename})" if e.filename else ""
    return type(e)(e.errno, f"cannot use the GPU lock folder {folder}: {e.strerror}{where}; every user of the machine must "
                            f"be able to make and read files there (the pool makes its folders mode 1777): fix its mode "
                            f"or set ${LOCKS_ENV} to another folder")


def _busy(path: Path, folder: Path) -> bool:
    """Whether a process holds the lock of `path` (a card's, a ticket's: a shared lock, let go at once)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, folder)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _note(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


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
    return folder / f"card-{_safe(card)}.lock"


def _try_lock(path: Path, folder: Path, label: str) -> int | None:
    """The locked file's descriptor, or None when another process holds the card."""
    fd, writable = _open(path)
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, folder)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if writable:  # the holder note, for other jobs' waiting messages: best effort
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # never through a hard link to another file
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} {label}".strip().encode() + b"\n", 0)
        except OSError:
            pass
    return fd


def _preferences(n: int, k: int) -> list[list[int]]:
    """Card index sets to try, best first: one card from the bottom; k adjacent ones from the top."""
    if k == 1:
        return [[i] for i in range(n)]
    return [list(range(i, i + k)) for i in range(n - k, -1, -1)]


def _try_claim(folder: Path, cards: list[str], k: int, label: str) -> Claim | None:
    paths = [_lock_path(folder, c) for c in cards]
    for chosen in [*_preferences(len(cards), k), None]:  # None: any k free cards
        fds, got = [], []
        try:
            for i in chosen if chosen is not None else range(len(cards)):
                fd = _try_lock(paths[i], folder, label)
                if fd is None:
                    if chosen is not None:
                        break
                    continue
                fds.append(fd)
                got.append(i)
                if len(got) == k:
                    break
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if len(got) == k:
            if chosen is None and k > 1:
                log.info("no %d adjacent free GPUs: took cards %s", k, ",".join(cards[i] for i in got))
            return Claim([cards[i] for i in got], fds)
        for fd in fds:
            os.close(fd)
    return None


# --- waiting in line ----------------------------------------------------------------------------

def _tickets(queue: Path) -> list[tuple[int, Path]]:
    """The ticket files in the queue folder, in order of arrival (live or not)."""
    try:
        names = os.listdir(queue)
    except FileNotFoundError:
        return []
    found = (re.fullmatch(r"(\d+)\.ticket", name) for name in names)
    return sorted((int(m[1]), queue / m[0]) for m in found if m)


def _waiting(queue: Path, folder: Path, cards: list[str] | None, before: int | None = None) -> list[str]:
    """The notes of the live tickets (jobs waiting for cards) that want any of `cards` (None: all),
    in order; only those numbered below `before` when given."""
    out = []
    for number, path in _tickets(queue):
        if before is not None and number >= before:
            break
        try:
            wanted, _, note = path.read_text().partition("\n")
        except OSError:  # gone: its job took its cards
            continue
        if cards is not None and wanted and set(wanted.split(",")).isdisjoint(cards):
            continue
        if _busy(path, folder):
            out.append(note.strip() or "?")
    return out


class _Ticket:
    """This process's place in the queue of the pool in `folder`: a file `<number>.ticket` it
    holds an exclusive flock on while it waits (its first line the cards it may take, then k and
    the job), numbered after every ticket there under the queue's gate lock. The process ending
    drops the flock: a ticket nobody holds counts for nothing, and the next ticket taken deletes it."""

    def __init__(self, folder: Path, cards: list[str], k: int, label: str):
        self.folder, self.queue, self.cards = folder, folder / QUEUE, cards
        gate, _ = _open(self.queue / GATE)
        try:
            _flock(gate, fcntl.LOCK_EX, folder)  # a short wait: the gate is held while a ticket is numbered
            tickets = _tickets(self.queue)
            for _, path in tickets:
                if not _busy(path, folder):
                    try:
                        path.unlink()  # a dead waiter's (another user's stays: the folder is sticky)
                    except OSError:
                        pass
            number = max((n for n, _ in tickets), default=-1)
            while True:
                number += 1
                self.path = self.queue / f"{number:012d}.ticket"
                try:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, TICKET_MODE)
                    break
                except FileExistsError:
                    continue
            self.number = number
            try:
                os.fchmod(self._fd, TICKET_MODE)
                _flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, folder)
                os.write(self._fd, f"{','.join(cards)}\n{k} GPU(s), pid {os.getpid()} {label}".strip().encode() + b"\n")
            except BaseException:
                self.close()
                raise
        finally:
            os.close(gate)

    def ahead(self) -> list[str]:
        """The live tickets before this one that want any of its cards."""
        return _waiting(self.queue, self.folder, self.cards, before=self.number)

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()  # first: a ticket seen after this is locked or gone, never free and there
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def waiting(folder: Path | None = None) -> list[str]:
    """Who waits for cards of the pool in `folder` (default lock_folder()), first in line first."""
    folder = Path(folder or lock_folder())
    return _waiting(folder / QUEUE, folder, cards=None)


def claim(k: int, cards: list[str], folder: Path | None = None, label: str = "", poll: float = POLL_S,
          timeout: float | None = None) -> Claim:
    """Take `k` of `cards` (CUDA_VISIBLE_DEVICES entries) from the pool in `folder` (default
    lock_folder()), waiting in line while fewer are free or an earlier waiter wants any of them;
    TimeoutError after `timeout` seconds, if given. `label` (the job) is written into the lock
    files for other jobs' waiting messages. LockUnsupported where the folder's filesystem has no
    flock; PermissionError (naming the folder) where another user's folder is closed to us."""
    if not 0 < k <= len(cards):
        raise ValueError(f"cannot take {k} of {len(cards)} GPUs ({','.join(cards) or 'none'})")
    folder = Path(folder or lock_folder())
    try:
        _make_pool(folder)
        return _claim(k, cards, folder, label, poll, timeout)
    except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
        raise _unusable(folder, e) from e


def _claim(k: int, cards: list[str], folder: Path, label: str, poll: float, timeout: float | None) -> Claim:
    queue = folder / QUEUE
    start = said = time.monotonic()
    ticket = None
    try:
        while True:
            ahead = ticket.ahead() if ticket is not None else _waiting(queue, folder, cards)
            if not ahead:
                got = _try_claim(folder, cards, k, label)
                if got is not None:
                    if ticket is not None:
                        log.info("took GPU(s) %s after %.0f s", ",".join(got.cards), time.monotonic() - start)
                    return got
            now = time.monotonic()
            if timeout is not None and now - start >= timeout:
                raise TimeoutError(f"no {k} free GPUs of {','.join(cards)} within {timeout:g} s")
            if ticket is None or now - said >= SAY_EVERY_S:
                busy = [f"{c} ({_note(_lock_path(folder, c))})" for c in cards if _busy(_lock_path(folder, c), folder)]
                before = f"; waiting before it: {'; '.join(ahead)}" if ahead else ""
                log.info("waiting for %d free GPU(s) of %d; busy: %s%s (locks in %s)", k, len(cards), "; ".join(busy) or "none",
                         before, folder)
                said = now
            if ticket is None:
                ticket = _Ticket(folder, cards, k, label)  # in line from now on: later jobs leave these cards to it
            time.sleep(poll * random.uniform(0.75, 1.25))  # jitter: jobs started together do not retry together
    finally:
        if ticket is not None:
            ticket.close()


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
