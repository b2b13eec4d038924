"""Fault suite: kill the workflow with SIGKILL at random moments, rerun, and check that the final
outputs equal those of an uninterrupted run.

Each round starts Snakemake on the tiny config, waits a random time, kills the whole process group
(Snakemake and every job it started) with SIGKILL, and unlocks the working directory. After the
last kill the workflow runs to the end. Then every file the uninterrupted reference run made is
compared: Parquet files, caches, manifests and raw files byte for byte; tables cell by cell and
metrics.json field by field, except the columns and fields that measure time and memory. The kills land in every stage: fetching (from a
local mirror), preprocessing, stand-in backbones, caching, pruning, training and the tables.

    python tests/fault_suite.py --kills 20 --seed 1      # prints a Markdown report

`tests/test_faults.py` runs a few kills of the same code in CI.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iisan.training.train import MEASURED_FIELDS  # noqa: E402

from conftest import SNAKEMAKE, copy_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["results/table7.csv", "resources/mini/stats.json"]
CONFIG = ["--configfile", "tests/configs/tiny.yaml", "tests/configs/faults.yaml"]
# metrics.json fields that measure the run, not its result
# table columns that measure time or memory
VOLATILE_COLUMN = re.compile(r"second|time|memory|TPME", re.I)
VOLATILE = MEASURED_FIELDS | {"resumed_from_epoch"}
ORDER = ["fetch", "preprocess", "standin", "cache", "prune", "train", "tables"]
GLOB_STAGE = {"resources/cache/**/cache.npy.partial": "cache", "results/runs/**/checkpoint.pt": "train"}
STAGES = {"generate_demo": "fetch", "fetch_amazon": "fetch", "preprocess": "preprocess", "build_standin": "standin",
          "cache": "cache", "prune": "prune", "train": "train", "table": "tables"}


@dataclass
class Kill:
    after_s: float
    running: list[str] = field(default_factory=list)  # stages of the jobs running at the kill
    finished: bool = False  # the run ended before the kill came
    aimed_at: str | None = None  # the stage start or file the kill waited for
    signal: str = "SIGKILL"


def prepare(wd: Path) -> Path:
    """A copy of the workflow with a small Amazon-format dataset in a local mirror."""
    from iisan.data.demo import DemoSpec, generate

    wd.mkdir(parents=True)
    copy_workflow(ROOT, wd)
    raw = generate(wd / "mirror-src", DemoSpec(n_items=60, n_users=90, n_groups=2, n_subgroups=2, image_size=8, seed=5))
    (wd / "mirror/mini").mkdir(parents=True)
    for kind in ("items", "users"):
        os.replace(raw[kind], wd / f"mirror/mini/{kind}.tsv")
    return wd


def _command(wd: Path, cores: int, *extra: str) -> list[str]:
    return SNAKEMAKE + ["--cores", str(cores), *extra, *CONFIG, "--config", f"mirror={wd / 'mirror'}", "--", *TARGETS]


def run_to_end(wd: Path, cores: int = 2, *extra: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(_command(wd, cores, *extra), cwd=wd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"snakemake failed in {wd}:\n{res.stderr[-4000:]}")
    return time.perf_counter() - t0


def _jobs(log: str) -> dict[str, str]:
    """jobid -> stage of every job Snakemake started, from its output."""
    return {jobid: STAGES.get(rule, rule)
            for rule, jobid in re.findall(r"^(?:local)?rule (\w+):\n(?:\s+.*\n)*?\s+jobid: (\d+)", log, re.M)}


def _started_stages(log: str) -> set[str]:
    return set(_jobs(log).values())


def _running_stages(log: str) -> list[str]:
    done = set(re.findall(r"Finished jobid: (\d+)", log))
    return sorted({stage for jobid, stage in _jobs(log).items() if jobid not in done})


def kill_once(wd: Path, after_s: float, cores: int = 2, when: str | None = None, sig: str = "SIGKILL") -> Kill:
    """Start the workflow and send its process group `sig` (SIGKILL, or SIGTERM: the jobs stop at
    once and Snakemake ends when they have) `after_s` seconds after it starts, or after `when`
    happens: a stage's first job starts (`when` = "cache"), a file appears (`when` = a glob such
    as "results/runs/**/checkpoint.pt"), or this attempt has finished k jobs (`when` =
    "jobs:k"). Then unlock the directory."""
    log_path = wd / f".fault-{time.time_ns()}.log"

    def waiting() -> bool:
        if when is None:
            return False
        if when.startswith("jobs:"):
            return len(re.findall(r"Finished jobid: ", log_path.read_text())) < int(when[5:])
        started = _started_stages(log_path.read_text())
        stage = GLOB_STAGE.get(when, when)
        # a stage already finished by earlier attempts never starts again: stop waiting once a
        # later stage has started
        if any(ORDER.index(s) > ORDER.index(stage) for s in started if s in ORDER):
            return False
        if "/" in when:
            return next(wd.glob(when), None) is None
        return when not in started

    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(wd, cores), cwd=wd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and waiting():
            time.sleep(0.05)
        try:
            proc.wait(timeout=after_s)
            kill = Kill(after_s, finished=True)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.Signals[sig])
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # SIGTERM did not stop the run within a minute
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"{sig} did not stop the workflow in {wd} within 60 s") from None
            kill = Kill(after_s, signal=sig)
    kill.running = _running_stages(log_path.read_text())
    kill.aimed_at = when
    log_path.unlink()
    subprocess.run(SNAKEMAKE + ["--unlock", *CONFIG, "--config", f"mirror={wd / 'mirror'}"], cwd=wd, capture_output=True)
    return kill


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _table(path: Path) -> list[dict]:
    """A CSV's rows without the columns that measure time or memory (exact text otherwise)."""
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [{k: v for k, v in r.items() if not VOLATILE_COLUMN.search(k)} for r in rows]


def compare(ref: Path, test: Path) -> list[str]:
    """Differences between the outputs of a run (`test`, which made the TARGETS) and those of
    an uninterrupted run (`ref`, which may have made more): every file `test` made."""
    problems = [f"{t}: missing" for t in TARGETS if not (test / t).is_file()]
    for folder in ("results", "resources"):
        for other in sorted((test / folder).rglob("*")):
            rel = other.relative_to(test)
            if not other.is_file() or rel.parts[1] == "benchmarks" or ".damaged-" in rel.name:
                continue
            f = ref / rel
            if not f.is_file():
                problems.append(f"{rel}: not made by the uninterrupted run")
            elif f.name == "metrics.json":
                if _strip(json.loads(f.read_text())) != _strip(json.loads(other.read_text())):
                    problems.append(f"{rel}: metrics differ")
            elif f.suffix == ".csv":
                if _table(f) != _table(other):
                    problems.append(f"{rel}: table differs")
            elif f.read_bytes() != other.read_bytes():
                problems.append(f"{rel}: bytes differ")
    return problems


# one kill aimed at each stage, in pipeline order: as its first job starts, or (cache, train) once
# it has written part of its work
AIMED = [("fetch", 0.0), ("preprocess", 0.0), ("standin", 0.5), ("resources/cache/**/cache.npy.partial", 0.0),
         ("prune", 0.0), ("results/runs/**/checkpoint.pt", 0.0), ("results/runs/**/checkpoint.pt", 0.5, "SIGTERM"),
         ("tables", 0.0)]


def plan_kills(n: int, rng: random.Random) -> list[tuple[str, float]]:
    """`n` kills: the aimed ones, with random ones (0.5-4 s after a start, or after one more job
    finished) spread between them, so that every stage is hit and the rest land anywhere."""
    plan = []
    n_random, gaps = max(0, n - len(AIMED)), len(AIMED) - 1  # random kills after each aimed one but the last
    for i, aimed in enumerate(AIMED[:n]):
        plan.append(aimed)
        share = n_random // gaps + (i < n_random % gaps) if i < gaps else 0
        plan += [(f"jobs:{rng.randint(0, 1)}", round(rng.uniform(0.5, 4), 1)) for _ in range(share)]
    return plan


def suite(workdir: Path, kills: int | list[tuple[str, float]], seed: int = 1, cores: int = 2,
          reference: Path | None = None) -> dict:
    """An uninterrupted reference run (or `reference`, a finished one), then the kills, then a
    final run; the comparison. `kills` is a number of kills (`plan_kills`), or a list of
    (`when`, seconds after it) for `kill_once`."""
    rng = random.Random(seed)
    ref_seconds = None
    if reference is None:
        reference = prepare(workdir / "reference")
        ref_seconds = run_to_end(reference, cores)
    wd = prepare(workdir / "faulted")
    log = []
    for when, delay, *sig in plan_kills(kills, rng) if isinstance(kills, int) else kills:
        log.append(kill_once(wd, delay, cores, when=when, sig=sig[0] if sig else "SIGKILL"))
    final_seconds = run_to_end(wd, cores)
    leftovers = sorted(str(p.relative_to(wd)) for p in (wd / "resources").rglob(".*") if p.is_file())
    return {"kills": log, "problems": compare(reference, wd), "reference_seconds": ref_seconds,
            "final_seconds": final_seconds, "temporary_files_left": leftovers, "reference": reference, "faulted": wd}


def report(result: dict) -> str:
    lines = ["| kill | when | after (s) | signal | stages running |", "|---|---|---|---|---|"]
    for i, k in enumerate(result["kills"], 1):
        running = "(run had finished)" if k.finished else ", ".join(k.running) or "(start-up)"
        lines.append(f"| {i} | {k.aimed_at or 'start'} | {k.after_s} | {k.signal} | {running} |")
    stages = sorted({s for k in result["kills"] for s in k.running})
    verdict = "identical to the uninterrupted run" if not result["problems"] else "DIFFERENT: " + "; ".join(result["problems"])
    lines += ["", f"stages hit: {', '.join(stages)}", f"final outputs: {verdict}",
              f"temporary files left by kills: {len(result['temporary_files_left'])}"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--workdir", default=None, help="default: a new temporary folder")
    a = p.parse_args()
    import tempfile

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="iisan-faults-"))
    result = suite(workdir, a.kills, a.seed, a.cores)
    print(report(result))
    print(f"reference run {result['reference_seconds']:.0f} s, final run after the kills {result['final_seconds']:.0f} s; "
          f"work in {workdir}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
