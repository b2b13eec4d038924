"""Job functions for tests/test_worker.py: run by a warm worker (or in the job's own process)."""

import json
import os
import sys
import time
from pathlib import Path


def report(out: str) -> None:
    """Write where and how this job ran; say something on stdout and stderr."""
    print("hello from the job on stdout", flush=True)
    print("hello from the job on stderr", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps({
        "pid": os.getpid(), "cwd": os.getcwd(), "umask": os.umask(0o022), "argv": sys.argv,
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "marker": os.environ.get("JOB_MARKER"),
        "nvml_check": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
        "torch_was_imported": "torch._dynamo" in sys.modules, "path": sys.path, "stdin": sys.stdin.read(),
    }))


def fail(code) -> None:
    if code == "raise":
        raise ValueError("the job failed on purpose")
    sys.exit(code)


def wait(marker: str) -> None:
    """Say where it runs (marker file), then wait to be stopped."""
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


def train(out: str) -> None:
    """A tiny cached IISAN run (tests/conftest.py's), its result to `out`."""
    import torch

    from conftest import stable, trainer

    torch.set_num_threads(1)
    Path(out).write_text(json.dumps(stable(trainer().fit(progress=False))))
