"""What every job of the workflow does before its one library call: send its output to the rule's
log, set up logging and the number of CPU threads (`workflow/scripts/*.py` use `job`)."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

STOPPED_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class JobStopped(BaseException):
    """SIGTERM arrived (raised where the job's main thread is; not an Exception, so no
    `except Exception` swallows it; `finally` blocks and atomic writes clean up)."""


def _stop(signum, frame):
    raise JobStopped(signal.Signals(signum).name)


def stops_file(log: str | os.PathLike) -> Path:
    """Where a job records the attempts that SIGTERM stopped (`<log>.stops`, one number a line)."""
    return Path(f"{log}.stops")


def memory_factor_of(log: str | os.PathLike, attempt: int) -> int:
    """1 plus the earlier attempts of the job writing `log` that failed otherwise than by SIGTERM.
    A cluster's time limit ends a job with SIGTERM; its retry needs more time, not more memory,
    while a failure for lack of memory (an OOM kill leaves no record) asks for one more share."""
    try:
        stopped = {int(x) for x in stops_file(log).read_text().split() if x.isdigit()}
    except OSError:
        stopped = set()
    return 1 + sum(a not in stopped for a in range(1, attempt))


@contextmanager
def job(snakemake, keep_attempts: bool = False):
    """Run a job's body with stdout and stderr (Python's and native libraries') appended to
    `snakemake.log[0]`, INFO logging there, `snakemake.threads` torch threads, and, for a local
    job whose `gpu` resource asks for cards, cards of its own (iisan.pipeline.gpus: CUDA_VISIBLE_DEVICES is
    narrowed to them before CUDA starts, and they are held until the job ends).

    SIGTERM stops the job at once (`JobStopped`, then exit status 143): what it had finished stays
    (a training run's last checkpoint, a cache build's recorded batches, every completed output),
    what it was writing is discarded, and the workflow's next run resumes it. A crash by signal
    (SIGBUS from a memory-mapped write, SIGSEGV) prints the Python stack into the log.

    A job stopped by SIGTERM (a cluster's time limit) records its attempt in `<log>.stops`, so
    that its retry asks for more time but not more memory (`memory_factor_of`).

    One of the project's named errors escaping the job (iisan.errors: a damaged or truncated
    file, a full disk, a model that cannot be fetched, ...) is printed as its message alone, with
    no traceback, and the job exits with status 1 (`exit_if_named`); any other exception is
    unexpected and Python prints its traceback into the log.

    keep_attempts: Snakemake deletes the log before each attempt of a job, so a retried or
    resumed job would lose its earlier attempts' output. With this, `<log>.attempts` is the same
    file as the log (a hard link that survives the deletion): each attempt starts the new log from
    it and appends under a dated header, so the log shows every attempt.
    """
    log = Path(snakemake.log[0])
    log.parent.mkdir(parents=True, exist_ok=True)
    attempt = getattr(getattr(snakemake, "resources", None), "attempt", None)
    if attempt == 1:  # a new run of the job: earlier runs' stop records no longer count
        stops_file(log).unlink(missing_ok=True)
    compile_cache(getattr(snakemake, "config", None) or {})
    attempts = log.with_name(log.name + ".attempts")
    if keep_attempts:
        earlier = attempts.read_bytes() if attempts.exists() else b""
        log.write_bytes(earlier)
        link = attempts.with_name(attempts.name + ".new")
        link.unlink(missing_ok=True)
        try:
            os.link(log, link)
            os.replace(link, attempts)
        except OSError:  # no hard links here: the attempts file is rewritten when the job ends
            attempts = None
    sys.stdout.flush()
    sys.stderr.flush()
    fh = open(log, "ab", buffering=0)  # noqa: SIM115 - kept open for the job's lifetime
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    if keep_attempts:
        print(f"== {datetime.now().astimezone().isoformat(timespec='seconds')} attempt {attempt or '?'} ==", flush=True)
    if os.environ.get("SLURM_JOB_ID"):
        print(slurm_allocation(os.environ), flush=True)
    from iisan.pipeline import gpus

    try:
        cards = gpus.for_job(int(getattr(getattr(snakemake, "resources", None), "gpu", 0) or 0),
                             label=f"{getattr(snakemake, 'rule', 'job')} {log}")
    except Exception as err:  # e.g. LockUnsupported: said alone, like the body's named errors
        exit_if_named(err)
        raise
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    if snakemake.threads:
        import torch

        torch.set_num_threads(snakemake.threads)
    faulthandler.enable(file=2)  # fd 2 is the log now
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main else None
    try:
        yield
    except JobStopped as stop:
        if attempt is not None:
            with open(stops_file(log), "a") as fh:
                fh.write(f"{attempt}\n")
        print(f"stopped by {stop}: what was finished is kept (a training run's last checkpoint, a cache build's recorded "
              "batches); rerun the workflow to resume", file=sys.stderr, flush=True)
        raise SystemExit(STOPPED_STATUS) from None
    except Exception as err:
        exit_if_named(err)
        raise  # unexpected: Python prints its traceback into the log
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        sys.stdout.flush()
        sys.stderr.flush()
        if cards is not None:
            cards.release()
        if keep_attempts and attempts is None:
            log.with_name(log.name + ".attempts").write_bytes(log.read_bytes())


def exit_if_named(err: BaseException) -> None:
    """For one of the project's named errors (iisan.errors: their message names the file, key or
    model and what to do), print the message alone to stderr (the job's log, which Snakemake's
    show-failed-logs prints) and exit with status 1; return for any other exception, which the
    caller re-raises so that its traceback is printed."""
    from iisan.errors import is_named, message

    if not is_named(err):
        return
    sys.stdout.flush()
    print(f"error: {message(err)}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def slurm_allocation(env) -> str:
    """One line saying which SLURM job runs this one, where, and what it was given."""
    cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_JOB_CPUS_PER_NODE", "?")
    return (f"SLURM job {env.get('SLURM_JOB_ID')} on {env.get('SLURMD_NODENAME', '?')}, partition "
            f"{env.get('SLURM_JOB_PARTITION', '?')}: {cpus} CPUs, {env.get('SLURM_MEM_PER_NODE', '?')} MB, "
            f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}")


def compile_cache(config: dict) -> None:
    """Point torch.compile's on-disk cache (inductor and Triton kernels, compiled graphs) at the
    config's `compile_cache` folder, shared by every job of the workflow, also across the nodes of
    a cluster, so that only the first run of a model shape compiles (about 30 s; later runs 3 s on an H200,
    docs/benchmarks.md). A TORCHINDUCTOR_CACHE_DIR already set wins; must run
    before torch is imported."""
    folder = config.get("compile_cache")
    if folder and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder).resolve())


def run_job(snakemake) -> None:
    """A train job (trains and evaluates one experiment; resumes from checkpoint.pt beside its
    output when restarted) or a profile job (times a few training steps at one batch size, Fig. 5):
    the body of workflow/scripts/run.py, in the job's process or in a warm worker (iisan.pipeline.worker)."""
    with job(snakemake, keep_attempts=snakemake.rule == "train"):
        from iisan.training.experiment import profile_experiment, run_experiment

        exp, paths = run_inputs(snakemake)
        if snakemake.rule == "profile":
            profile_experiment(exp, **paths, out=snakemake.output[0], batch_size=int(snakemake.wildcards.batch),
                               steps=snakemake.params.steps)
        else:
            run_experiment(exp, **paths, out=snakemake.output[0], keep_checkpoint=snakemake.config["keep_checkpoints"],
                           processes=processes_of(snakemake))


def processes_of(snakemake) -> int:
    """The processes a train job spreads its run over (iisan.training.distributed): one per card
    its `gpu` resource asks for (the plan's choice, iisan.pipeline.budget), when CUDA sees that
    many (the job's own cards locally, the scheduler's on a cluster); else one."""
    import torch

    cards = int(getattr(getattr(snakemake, "resources", None), "gpu", 0) or 0)
    if cards <= 1 or not torch.cuda.is_available():
        return 1
    seen = torch.cuda.device_count()
    if seen < cards:  # as iisan.pipeline.gpus gives a job asking more cards than there are: all of them
        logging.getLogger(__name__).warning("the job asks for %d GPUs, CUDA sees %d: its run takes %d processes",
                                            cards, seen, seen)
    return max(1, min(cards, seen))


def run_inputs(snakemake):
    """(experiment, paths) of a train or profile job: the experiment from the rule's params with
    the config's speed settings, and every file from the rule's inputs (get_run_inputs in
    workflow/rules/common.smk): the dataset, the cache folders, the item table, the stand-in
    folder of each tower (input `standin<t>`, for the towers whose model the workflow builds), the
    caption set of each tower that reads a caption field (input `captions<t>`) and the image
    archive."""
    from iisan.config import Experiment

    exp = Experiment.from_dict(snakemake.params.experiment).with_speed(snakemake.config.get("speed"))
    i = snakemake.input
    paths = {
        "dataset_dir": Path(i.sequences).parent,
        "cache_dirs": [Path(a).parent for a in i.caches] if "caches" in i.keys() else [],
        "items": Path(i.item_table) if "item_table" in i.keys() else None,
        "standins": [Path(i[f"standin{t}"]).parent if f"standin{t}" in i.keys() else None for t in range(len(exp.towers))],
        "captions": {t: Path(i[f"captions{t}"]) for t in range(len(exp.towers)) if f"captions{t}" in i.keys()},
        "images": i.images if "images" in i.keys() else None,
    }
    return exp, paths
