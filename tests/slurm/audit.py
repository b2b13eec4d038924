"""What each SLURM job of a Snakemake run asked for, and what the scheduler gave it.

    python tests/slurm/audit.py SNAKEMAKE_LOG [--markdown]

Reads the run's log (each job's `rule`, `jobid`, `threads` and `resources`, and the line
`Job N has been submitted with SLURM jobid M`), asks `scontrol show job -d` what SLURM gave
each submitted job (partition, CPUs, memory, time limit, the cards of its allocation), and prints
one row per rule: jobs, asked and got. Exits 1, listing them, if any job got other than it asked
(a job still queued or already forgotten by slurmctld, see MinJobAge, counts as a mismatch).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


@dataclass
class Ask:
    rule: str
    threads: int = 1
    resources: dict = field(default_factory=dict)


def asks(log_text: str) -> dict[str, Ask]:
    """SLURM job id -> what Snakemake asked for it (the job block printed last before the
    submission: a retry prints its own, with the attempt's resources)."""
    blocks: dict[str, Ask] = {}
    out: dict[str, Ask] = {}
    current: Ask | None = None
    for line in log_text.splitlines():
        if m := re.match(r"^(?:local)?rule (\S+):$", line):
            current = Ask(m.group(1))
        elif current is not None and (m := re.match(r"^\s+jobid: (\d+)$", line)):
            blocks[m.group(1)] = current
        elif current is not None and (m := re.match(r"^\s+threads: (\d+)$", line)):
            current.threads = int(m.group(1))
        elif current is not None and (m := re.match(r"^\s+resources: (.*)$", line)):
            current.resources = dict(kv.split("=", 1) for kv in m.group(1).split(", ") if "=" in kv)
        elif m := SUBMITTED.search(line):
            out[m.group(2)] = blocks[m.group(1)]
    return out


def minutes(limit: str) -> int:
    """A SLURM time limit ([days-]hours:minutes:seconds) in minutes."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (parts[2] > 0)


def megabytes(value: str) -> int:
    number, unit = re.match(r"([\d.]+)([KMGT]?)", value).groups()
    return round(float(number) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[unit])


def got(jobid: str) -> dict | None:
    """What SLURM gave job `jobid`, or None when slurmctld no longer knows it."""
    res = subprocess.run(["scontrol", "show", "job", "-d", "-o", jobid], capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout.strip():
        return None
    text = res.stdout
    fields = dict(re.findall(r"(\w[\w/:]*)=(\S*)", text))
    gres = re.search(r"JOB_GRES=\S*?gpu(?::[^:,\s]+)?:(\d+)", text)
    return {
        "state": fields.get("JobState"),
        "partition": fields.get("Partition"),
        "cpus": int(fields.get("NumCPUs", 0)),
        "mem_mb": megabytes(fields.get("MinMemoryNode", "0")),
        "runtime": minutes(fields.get("TimeLimit", "0")),
        "gpu": int(gres.group(1)) if gres else 0,
    }


def audit(log: Path) -> tuple[dict[str, list], list[str]]:
    """(per rule: a row for each job (asked, got), the mismatches as text)."""
    rows: dict[str, list] = {}
    bad = []
    for jobid, ask in asks(log.read_text(errors="replace")).items():
        r = ask.resources
        wanted = {
            "partition": r.get("slurm_partition"),
            "cpus": ask.threads,
            "mem_mb": int(r.get("mem_mb", 0)),
            "runtime": int(r.get("runtime", 0)),
            "gpu": int(r.get("gpu", 0)),
        }
        given = got(jobid)
        rows.setdefault(ask.rule, []).append((wanted, given))
        if given is None:
            bad.append(f"{ask.rule} (SLURM job {jobid}): unknown to slurmctld")
            continue
        diff = [f"{k} asked {v}, got {given[k]}" for k, v in wanted.items() if v is not None and given[k] != v]
        if diff:
            bad.append(f"{ask.rule} (SLURM job {jobid}): " + "; ".join(diff))
    return rows, bad


def span(values) -> str:
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def table(rows: dict[str, list], markdown: bool = False) -> str:
    head = ["rule", "jobs", "partition", "CPUs", "memory MB", "runtime min", "GPUs", "got what it asked"]
    lines = []
    for rule, jobs in sorted(rows.items()):
        asked = [w for w, _ in jobs]
        ok = sum(g is not None and all(w[k] is None or g[k] == w[k] for k in w) for w, g in jobs)
        lines.append([rule, str(len(jobs)), span(a["partition"] or "(default)" for a in asked), span(a["cpus"] for a in asked),
                      span(a["mem_mb"] for a in asked), span(a["runtime"] for a in asked), span(a["gpu"] for a in asked),
                      f"{ok} of {len(jobs)}"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(l) + " |" for l in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rows, bad = audit(args.log)
    print(table(rows, args.markdown))
    for line in bad:
        print("MISMATCH", line, file=sys.stderr)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
