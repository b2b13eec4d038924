"""A warm worker: jobs that start in milliseconds instead of seconds.

Every train job is a fresh Python process, and before its first step it imports torch, the
compiler (torch._dynamo, inductor: sympy, networkx, FSDP) and this library: 2 s on the 2-core
CPU of our CI, 8.8 s on the H200 node of docs/benchmarks.md. A
workflow of Table VIII's 66 short runs pays that 66 times. `iisan worker` pays it once: it imports
all of that, never touches the GPU, and forks a child per job. The child is the job: it takes
over the job process's working directory, environment (so also CUDA_VISIBLE_DEVICES, set per
job), umask, stdin, stdout and stderr, and runs the job's function exactly as the job process
would (so the child, not the worker, takes the job's own GPUs, iisan.pipeline.gpus, and narrows
CUDA_VISIBLE_DEVICES to them before CUDA starts in it; it holds them until it ends); the job
process waits, forwards SIGINT, SIGTERM and SIGHUP to it, and exits with its status. Results
are the same either way (tests/test_worker.py).

    iisan worker [--socket PATH] &           # one per machine and user, before snakemake
    export IISAN_WORKER=PATH                 # the jobs look for it here (default PATH: iisan worker --help)
    snakemake --cores 8 results/table8.csv

A job runs in its own process instead, with one line on stderr saying why, when IISAN_WORKER is
unset, nothing answers there (a SLURM job on another node), the worker runs another Python or
another copy of this library, the job's environment differs from the worker's in a variable
that libraries read when imported (TORCH*, CUDA*, OMP_*, ...: the worker's imports would not
match it), or a module the worker imported has changed on disk since (restart the worker after
editing the library); also when the worker does not answer within IISAN_WORKER_TIMEOUT seconds
(default 30: a stopped or hung worker). Stopping the worker (Ctrl-C, SIGTERM) leaves running jobs
running. The worker refuses to start when its imports started a thread or asked the CUDA driver
anything (torch then marks forked children unable to start CUDA): neither survives a fork.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import signal
import socket
import struct
import sys
import tempfile
import threading
import traceback
from pathlib import Path

ENV = "IISAN_WORKER"
TIMEOUT_ENV, REPLY_TIMEOUT_S = "IISAN_WORKER_TIMEOUT", 30  # seconds a job waits for the worker to take it
# what a train or profile job imports, most of it on first use (the optimizer, torch.compile). Not
# polars (0.1 s): importing it starts threads (jemalloc's, an out-of-core cleaner) that a forked
# child would not have; nor Triton, whose driver could start CUDA, which a fork cannot carry over.
PRELOAD = ("iisan.training.experiment", "iisan.pipeline.jobs", "iisan.training.train", "torch.optim", "torch._dynamo",
           "torch._inductor.compile_fx", "torch._inductor.codecache", "torch._functorch.aot_autograd",
           "torch._inductor.graph", "transformers", "snakemake.script")
# variables read when a library is imported: a job whose environment differs from the worker's
# in one of these runs in its own process (CUDA_VISIBLE_DEVICES is read when CUDA starts, in the
# job; TORCHINDUCTOR_CACHE_DIR when torch.compile writes, in the job)
# (polars reads its jemalloc settings, _RJEM_MALLOC_CONF, when it is imported: in the job, see PRELOAD)
IMPORT_TIME_ENV = ("PYTHON", "TORCH", "PYTORCH", "TRITON", "CUDA", "NVIDIA", "NCCL", "OMP_", "MKL_", "KMP_",
                   "OPENBLAS", "LD_", "HF_", "TRANSFORMERS", "TOKENIZERS", "POLARS", "MALLOC")
READ_AT_USE = ("CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR",
               "PYTHONUNBUFFERED",  # only how output is buffered (a job's output goes to its log unbuffered)
               # thread counts, which Snakemake sets per job to its threads: a job sets torch's itself
               # (iisan.pipeline.jobs.job); numpy's BLAS keeps the worker's, which changes speed, not results
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS", "GOTO_NUM_THREADS")
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # set while preloading (serve)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_socket() -> Path:
    """$XDG_RUNTIME_DIR/iisan/worker.sock, else <tmp>/iisan-<uid>/worker.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "iisan" if runtime else Path(tempfile.gettempdir()) / f"iisan-{os.getuid()}"
    return folder / "worker.sock"


# --- messages: a 4-byte length and a pickle, file descriptors alongside one of them ----------------

def _send(sock: socket.socket, obj, fds=()) -> None:
    data = pickle.dumps(obj)
    data = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list | None = None) -> bytes | None:
    buf = b""
    while len(buf) < n:
        if fds is not None and not buf:
            chunk, got, _, _ = socket.recv_fds(sock, n - len(buf), 8)
            fds.extend(got)
        else:
            chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv(sock: socket.socket, fds: list | None = None):
    """The next message, or None when the other side has closed the connection."""
    head = _recv_exact(sock, 4, fds)
    if head is None:
        return None
    body = _recv_exact(sock, struct.unpack("!I", head)[0])
    return None if body is None else pickle.loads(body)


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _package() -> str:
    return str(Path(__file__).resolve().parent)


# --- the job process's side -------------------------------------------------------------------

def run(target: str, *args) -> int:
    """Run `target` ("module:function") with `args` in a warm worker (IISAN_WORKER), else in
    this process; return the exit status a job script should exit with. In this process an
    exception propagates as usual (status 0 means it returned)."""
    path = os.environ.get(ENV)
    if path:
        status = _delegate(Path(path), target, args)
        if status is not None:
            return status
    _resolve(target)(*args)
    return 0


def _delegate(path: Path, target: str, args: tuple) -> int | None:
    """The job's exit status from the worker at `path`, or None (said on stderr) when it cannot take the job."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as err:
        print(f"iisan: no worker at {path} ({err.strerror}); running the job in this process", file=sys.stderr, flush=True)
        sock.close()
        return None
    request = {"target": target, "args": args, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
               "argv": sys.argv, "path": sys.path, "flags": tuple(sys.flags),
               "executable": os.path.realpath(sys.executable), "package": _package()}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with sock:
        # a stopped or hung worker still completes connections (the listen backlog): wait for its
        # answer only so long; if it answers later, its send fails on the closed socket and the job
        # does not run twice. The job's streams go only to a worker that has taken the job.
        sock.settimeout(float(os.environ.get(TIMEOUT_ENV, REPLY_TIMEOUT_S)))
        try:
            _send(sock, request)
            reply = _recv(sock)
            if reply is not None and "accepted" in reply:
                _send(sock, {"streams": "stdin, stdout, stderr"}, fds=(0, 1, 2))
        except TimeoutError:
            reply = {"declined": f"no answer within {sock.gettimeout():g} s"}
        except OSError as err:
            reply = {"declined": err.strerror or str(err)}
        sock.settimeout(None)
        if reply is None or "declined" in reply:
            why = "it closed the connection" if reply is None else reply["declined"]
            print(f"iisan: the worker at {path} did not take the job ({why}); running it in this process",
                  file=sys.stderr, flush=True)
            return None
        def forward(signum, frame):
            try:
                _send(sock, {"signal": signum})
            except OSError:
                pass

        previous = {s: signal.signal(s, forward) for s in FORWARDED}
        try:
            while True:
                try:
                    msg = _recv(sock)
                except OSError:
                    msg = None
                if msg is None:  # the worker went away without the job's status
                    print(f"iisan: lost the worker at {path} while it ran the job", file=sys.stderr, flush=True)
                    return 1
                if "status" in msg:
                    break
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    status = msg["status"]
    if status < 0:  # killed by a signal: end the same way, so the caller sees what it would have seen
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the worker's side ------------------------------------------------------------------------

def _snapshot() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every imported module's file."""
    seen = {}
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if f and f not in seen:
            try:
                st = os.stat(f)
            except OSError:
                continue
            seen[f] = (st.st_mtime_ns, st.st_size)
    return seen


def _import_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV) and k not in READ_AT_USE}


def _why_not(request: dict, start_env: dict, snapshot: dict) -> str | None:
    """Why this worker cannot run the request exactly as its own process would, or None.
    start_env: the worker's environment before its imports; a variable that an import set there
    may be in the job's with the same value (the job's script may have made the same import)."""
    if request["executable"] != os.path.realpath(sys.executable):
        return f"the job runs {request['executable']}, the worker {os.path.realpath(sys.executable)}"
    if request["flags"] != tuple(sys.flags):
        return f"the job's interpreter options differ from the worker's ({request['flags']} against {tuple(sys.flags)})"
    if request["package"] != _package():
        return f"the job uses the library at {request['package']}, the worker {_package()}"
    mine, theirs = _import_env(start_env), _import_env(request["env"])
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key) and not (key not in mine and theirs[key] == os.environ.get(key)):
            return (f"environment variable {key} is {theirs.get(key)!r} for the job, {mine.get(key)!r} for the worker; "
                    "start the worker with the job's environment")
    for f, (mtime, size) in snapshot.items():
        try:
            st = os.stat(f)
        except OSError:
            return f"{f} has gone since the worker started; restart it"
        if (st.st_mtime_ns, st.st_size) != (mtime, size):
            return f"{f} has changed since the worker started; restart it"
    return None


def _child(conn: socket.socket, start_env: dict, snapshot: dict) -> int:
    """In the forked child: take the job over and run it; the return value is its exit status."""
    request = _recv(conn)
    if request is None:
        return 2
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    why = "the job runs as another user" if uid != os.getuid() else _why_not(request, start_env, snapshot)
    if why:
        _send(conn, {"declined": why})
        return 0
    _send(conn, {"accepted": os.getpid()})
    fds: list[int] = []  # the job process's stdin, stdout, stderr, sent once it knows it is taken
    if _recv(conn, fds) is None or len(fds) != 3:
        return 2
    os.setsid()  # the worker's Ctrl-C is not the job's; the job's signals come from its process
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    sys.argv = request["argv"]
    sys.path[:] = request["path"]  # the job script's folder first, and what Snakemake's preamble added
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)

    def listen():  # signals from the job process; its end (killed outright) ends the job
        while True:
            try:
                msg = _recv(conn)
            except OSError:
                msg = None
            signum = signal.SIGTERM if msg is None else msg.get("signal")
            if signum:
                os.killpg(0, signum) if signum != signal.SIGINT else os.kill(os.getpid(), signum)
            if msg is None:
                return

    threading.Thread(target=listen, daemon=True).start()
    atexit._clear()  # the worker's exit handlers are not the job's
    try:
        _resolve(request["target"])(*request["args"])
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # Python ends by SIGINT then
        traceback.print_exc()
        status = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - what Python prints for an uncaught exception, and its status
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _send(conn, {"status": status})  # also when the worker has stopped meanwhile (it reports deaths by signal)
    return max(status, 0)


def _fork_poisoned() -> bool:
    """Whether a child forked now could not start CUDA (torch.cuda._is_in_bad_fork() in the child):
    torch marks the children of a process that has asked the CUDA driver anything, even whether a GPU
    is there, and the driver could not serve them. A fork of the worker, ended at once, says."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    pid = os.fork()
    if pid == 0:
        try:
            bad = bool(torch.cuda._is_in_bad_fork())
        except BaseException:  # noqa: BLE001 - whatever stops the probe counts against forking
            bad = True
        os._exit(1 if bad else 0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0


def serve(path: Path, preload=PRELOAD, ready=None, exit_with_parent: bool = False) -> None:
    """Import `preload`, listen at `path` and run each job that connects in a forked child, until
    SIGINT or SIGTERM (or, with exit_with_parent, until the process that started it has gone).
    `ready` (for tests) is called once it listens."""
    parent = os.getppid()
    start_env = dict(os.environ)  # before the imports, some of which set variables (as they will in a job)
    # torch.cuda.is_available() (transformers calls it when imported) asks the CUDA driver unless told
    # to ask NVML; once the driver has been asked anything, torch marks every forked child unable to
    # start CUDA. Read when called, so the job's own value holds in the job.
    os.environ.setdefault(NVML_CHECK, "1")
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional dependency this machine lacks: its jobs import what they need
            pass
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise RuntimeError("iisan worker: CUDA started while importing; a forked job could not use the GPU")
    # a Python thread some import started would be missing in each forked job, with any lock it held.
    # (Native threads are not counted: on an H200 the preloaded process had some, and jobs forked
    # from it ran correctly, docs/benchmarks-history.md.)
    if threading.active_count() > 1:
        raise RuntimeError(f"iisan worker: {threading.active_count() - 1} more threads after importing; "
                           "forking would be unsafe")
    if _fork_poisoned():
        raise RuntimeError("iisan worker: importing asked the CUDA driver for its devices; a forked job could not use "
                           f"the GPU ({NVML_CHECK}=1 keeps torch.cuda.is_available() off the driver)")
    snapshot = _snapshot()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if len(os.fsencode(path)) > 100:
        raise ValueError(f"iisan worker: socket path {path} is too long for a Unix socket (100 bytes at most)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        raise RuntimeError(f"iisan worker: another worker already listens at {path}")
    except (FileNotFoundError, ConnectionRefusedError):
        path.unlink(missing_ok=True)  # a socket left by a worker that was killed
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(64)
    if exit_with_parent:
        listener.settimeout(1.0)
    jobs: dict[int, socket.socket] = {}

    def reap(*_):  # each finished job's status to its job process, as waitpid gives it
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = jobs.pop(pid, None)
            if conn is not None:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                try:
                    _send(conn, {"status": code})
                except OSError:
                    pass
                conn.close()

    class Stop(Exception):
        pass

    stopping = []

    def stop(*_):  # once: a second signal (`timeout` and a user both sending SIGTERM) must not break the cleanup
        if not stopping:
            stopping.append(True)
            raise Stop

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"iisan worker {os.getpid()}: listening at {path} (export {ENV}={path})", file=sys.stderr, flush=True)
    if ready:
        ready()
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if os.getppid() != parent:  # Snakemake was killed outright: do not outlive it
                    break
                continue
            conn.settimeout(None)
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
            try:
                pid = os.fork()
                if pid == 0:
                    status = 1
                    try:
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
                        listener.close()
                        for other in jobs.values():
                            other.close()
                        status = _child(conn, start_env, snapshot)
                    except BaseException:  # noqa: BLE001
                        traceback.print_exc()
                    finally:
                        for stream in (sys.stdout, sys.stderr):
                            try:
                                stream.flush()
                            except Exception:  # noqa: BLE001, S110
                                pass
                        os._exit(status)
                jobs[pid] = conn
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    except Stop:
        pass
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        print(f"iisan worker {os.getpid()}: stopped; {len(jobs)} running job(s) go on", file=sys.stderr, flush=True)


# --- one worker per Snakemake run (config `worker: true`) ----------------------------------------

def start_for_workflow(enabled: bool, local: bool):
    """The Snakefile's onstart: with `enabled` and jobs that run on this machine (`local`), start
    a worker for this run's jobs and point them at it (IISAN_WORKER in this process's environment,
    which local jobs inherit). Nothing when IISAN_WORKER is already set (a worker of your own).
    Returns the worker process for stop_for_workflow."""
    if not enabled or not local or os.environ.get(ENV):
        return None
    import subprocess

    path = default_socket().with_name(f"worker-{os.getpid()}.sock")
    proc = subprocess.Popen([sys.executable, "-m", "iisan.cli", "worker", "--socket", str(path), "--exit-with-parent"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # once it listens
    if "listening at" not in line:
        proc.wait()
        print(f"iisan: the worker did not start ({line.strip() or proc.stderr.read().strip()}); jobs run on their own",
              file=sys.stderr, flush=True)
        return None
    print(line.strip(), file=sys.stderr, flush=True)
    os.environ[ENV] = str(path)
    return proc


def stop_for_workflow(proc) -> None:
    """The Snakefile's onsuccess and onerror: stop the run's worker."""
    if proc is not None and proc.poll() is None:
        os.environ.pop(ENV, None)
        proc.terminate()
        proc.wait()
