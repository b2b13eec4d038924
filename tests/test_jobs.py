"""A job's output goes to its rule's log; with keep_attempts, every attempt of a job stays in it."""

import subprocess
import sys

JOB = """
import logging, os, sys
from types import SimpleNamespace
from iisan.jobs import job

snakemake = SimpleNamespace(log=[sys.argv[1]], threads=1, resources=SimpleNamespace(attempt=int(sys.argv[2])))
with job(snakemake, keep_attempts=True):
    print("python stdout", sys.argv[2])
    logging.getLogger("iisan.test").info("a log record")
    os.write(2, b"native stderr\\n")
    if sys.argv[2] == "1":
        raise SystemExit("attempt 1 failed")
"""


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
