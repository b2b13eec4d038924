"""One training run spread over several processes of one machine, one card each (PyTorch DDP).

The run is the one-process run at the same global batch: every process reads the same shuffled
batches (the trainer's generator is seeded alike everywhere) and trains on its own 1/k of each
batch's rows (`shard_rows`); its item embeddings are gathered from every process with their
gradients (`gather_with_grad`), so the in-batch negatives and the loss are those of the whole
batch, and DDP sums the gradients. Evaluation embeds a 1/k share of the items and ranks a 1/k
share of the users in each process (`share`), gathered and summed. Process 0 writes checkpoints
and the run's result; a checkpoint holds every process's random streams.

`launch` starts the processes through torch's elastic launcher (what `torchrun --standalone`
runs): a rendezvous on a free local port, so that several runs on one machine never meet, NCCL
between CUDA cards and gloo between CPU processes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# the signals torch's launcher takes over while its processes run (it ends them on any of these)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

__all__ = ["launch", "rank", "world", "distributed", "shard_rows", "share", "gather_with_grad", "gather", "gather_rows",
           "all_sum", "all_objects", "local_device"]


def distributed() -> bool:
    """Whether this process is one of a run's several processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world() -> int:
    return dist.get_world_size() if distributed() else 1


def local_device() -> torch.device | None:
    """The card of this process (its LOCAL_RANK among the machine's visible cards) when the run
    is on several CUDA cards; None otherwise."""
    if distributed() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank())))
    return None


def shard_rows(batch: torch.Tensor) -> torch.Tensor:
    """This process's rows of a global batch (B, S): the batch padded with all-padding rows to a
    multiple of the processes (they add no loss rows and only masked columns), then cut into
    equal consecutive parts, part r for process r."""
    k = world()
    if k == 1:
        return batch
    pad = -batch.shape[0] % k
    if pad:
        batch = torch.cat([batch, batch.new_zeros(pad, *batch.shape[1:])])
    return batch.view(k, -1, *batch.shape[1:])[rank()]


def share(n: int, r: int | None = None) -> tuple[int, int]:
    """(start, end) of process r's (default: this process's) consecutive share of n things (the
    first n % k processes take one more)."""
    k, r = world(), rank() if r is None else r
    base, extra = divmod(n, k)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` (same shape everywhere) concatenated along dim 0 in process order;
    the gradient flowing back to this process's `x` sums what every process's loss sends it."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` (same shape everywhere) concatenated along dim 0, no gradient."""
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every process's `share` of n rows, `x` here, concatenated in process order (n rows), no
    gradient."""
    counts = [end - start for start, end in (share(n, r) for r in range(world()))]
    most = max(counts)
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) if x.shape[0] < most else x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the processes (a new tensor; `x` itself when there is one process)."""
    if not distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_objects(obj) -> list:
    """Every process's picklable `obj`, in process order."""
    if not distributed():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def _entry(fn: Callable, backend: str | None, threads: int, args: tuple) -> Any:
    """One process of `launch`: join the group, take its card, run `fn(*args)`."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s [rank {os.environ.get('RANK', '?')}] %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    try:
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, *args, processes: int, backend: str | None = None) -> Any:
    """`fn(*args)` in `processes` processes of one group (torch's elastic launcher, as
    `torchrun --standalone --nproc-per-node processes` runs them; `fn` and `args` picklable:
    they are spawned), and process 0's return value. Each process takes the card of its local
    rank among the visible ones; `backend` defaults to NCCL with CUDA, else gloo. A process
    that fails ends the others, and its error is raised here (torch's ChildFailedError, which
    names the failing process and its traceback)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"iisan-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main else {}
    try:
        results = elastic_launch(config, _entry)(fn, backend, torch.get_num_threads(), args)
    except SignalException as stop:
        # the launcher's own handler took the signal and ended the processes: the caller's
        # handler of that signal (a job's SIGTERM: stop, keep what is finished) takes it now
        previous = handlers.get(stop.sigval)
        if callable(previous):
            previous(stop.sigval, None)
        raise
    except ChildFailedError as err:
        said = []
        for r, failure in sorted(err.failures.items(), key=lambda f: (f[1].timestamp, f[0])):
            message = failure.message  # the error file's record of the exception (spawn records it)
            message = message.get("message", message) if isinstance(message, dict) else message
            said.append(f"process {r}: {str(message).splitlines()[0] if message else failure.signal_name()}")
        raise RuntimeError(f"{len(said)} of the run's {processes} processes failed ({'; '.join(said)}); "
                           "their tracebacks are in the log") from err
    finally:
        for sig, handler in handlers.items():  # the launcher replaced them
            signal.signal(sig, handler)
    return results[0]
