"""Golden outputs of the tiny workflow (tests/configs/tiny.yaml): every table and figure CSV and
every run's result, without what measures time or memory. A refactor must leave them identical.

The numbers depend on the CPU:

* bitsandbytes computes the 4-bit stand-in's states with a fused bf16 kernel on CPUs with
  AVX512-BF16 and with its fp32 reference path elsewhere; the two give different caches, so
  different 4-bit runs. There is one golden file per path: `tiny.json` (fused) and
  `tiny-reference.json` (reference), and a machine is compared with the one its bitsandbytes uses.
* oneDNN and ATen pick float32 kernels by instruction set: on a CPU with the signature a file
  records, the comparison is exact; on another, numbers may differ in the last digits (and a
  near-tie may flip one user's rank): there they must agree within `ELSEWHERE`.

Rewrite a file from a finished tiny run (the workflow test's, or /tmp/gold/run.py-style):

    python tests/golden.py WORKDIR               # this machine's path
    # the other path, on an AVX512-BF16 machine: run the tiny workflow with
    #   PYTHONPATH=tests/golden/reference_path ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    # (bitsandbytes' reference path, AVX2 float kernels), then
    python tests/golden.py WORKDIR --reference
"""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
from pathlib import Path

import torch

GOLDEN = {"fused": Path(__file__).resolve().parent / "golden" / "tiny.json",
          "reference": Path(__file__).resolve().parent / "golden" / "tiny-reference.json"}
# a run's result: what metrics.json says about the model, not about the run's paths or costs
RESULT_FIELDS = ("valid", "test", "best_epoch", "epochs_run", "history", "trainable_params", "total_params", "layers",
                 "cache_bytes", "seed")
HISTORY_FIELDS = ("epoch", "loss", "valid_hr@10", "valid_ndcg@10")
VOLATILE_COLUMNS = ("second", "time", "memory", "tpme", "device")
CLAIM_COLUMNS = ("table", "dataset", "claim")
# tables hold percentages (1.0 = one point), runs fractions and losses
ELSEWHERE = {"tables": {"rel": 0.05, "abs": 1.0}, "runs": {"rel": 0.05, "abs": 0.01}}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


def cpu_signature() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{platform.machine()} torch {torch.__version__} " + " ".join(f for f in FLAGS if f in flags)


def bnb_path() -> str:
    """Which 4-bit CPU path bitsandbytes takes here: fused (AVX512-BF16) or reference."""
    try:
        from bitsandbytes.nn.modules import has_avx512bf16
    except ImportError:
        return "reference"
    return "fused" if has_avx512bf16() else "reference"


def _table(path: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if path.name == "claims.csv":
        # which claims are decided; their numbers come from the tables checked here (and from
        # measured times and memory), their logic has unit tests (tests/test_tables.py)
        return [{k: r[k] for k in CLAIM_COLUMNS} for r in rows]
    return [{k: v for k, v in r.items() if not any(w in k.lower() for w in VOLATILE_COLUMNS)} for r in rows]


def _result(path: Path) -> dict:
    m = json.loads(path.read_text())
    out = {k: m[k] for k in RESULT_FIELDS if k in m}
    out["history"] = [{k: h[k] for k in HISTORY_FIELDS} for h in m["history"]]
    return out


def snapshot(wd: Path) -> dict:
    """Every CSV under results/ and every run's result, keyed by path."""
    results = Path(wd) / "results"
    return {
        "tables": {str(p.relative_to(wd)): _table(p) for p in sorted(results.glob("*.csv"))},
        "runs": {str(p.relative_to(wd)): _result(p) for p in sorted((results / "runs").rglob("metrics.json"))},
    }


def _close(a, b, where: str, out: list[str], tol: dict) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            out.append(f"{where}: keys {sorted(a)} != {sorted(b)}")
        for k in a.keys() & b.keys():
            _close(a[k], b[k], f"{where}.{k}", out, tol)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} entries != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]", out, tol)
    else:
        try:
            x, y = float(a), float(b)
        except (TypeError, ValueError):
            if a != b:
                out.append(f"{where}: {a!r} != {b!r}")
            return
        if abs(x - y) > max(tol["abs"], tol["rel"] * abs(y)):
            out.append(f"{where}: {a!r} != {b!r}")


def differences(wd: Path, golden: Path | None = None) -> tuple[list[str], bool]:
    """(differences from the golden outputs of this machine's bitsandbytes path, whether the
    comparison was exact)."""
    want = json.loads((golden or GOLDEN[bnb_path()]).read_text())
    got = snapshot(wd)
    exact = want["cpu"] == cpu_signature()
    out: list[str] = []
    for part in ("tables", "runs"):
        missing = sorted(want[part].keys() - got[part].keys())
        extra = sorted(got[part].keys() - want[part].keys())
        out += [f"{p}: missing" for p in missing] + [f"{p}: not in the golden outputs" for p in extra]
        for p in sorted(want[part].keys() & got[part].keys()):
            if exact:
                if want[part][p] != got[part][p]:
                    out.append(f"{p}: differs")
            else:
                _close(got[part][p], want[part][p], p, out, ELSEWHERE[part])
    return out, exact


def write(wd: Path, reference: bool = False) -> Path:
    """Record `wd`'s outputs as this machine's golden file, or (`reference`) as the reference
    path's, made under the simulation above, whose signature no real CPU has (so it is always
    compared within tolerance)."""
    golden = GOLDEN["reference" if reference else bnb_path()]
    cpu = "simulated reference path on " + cpu_signature() if reference else cpu_signature()
    golden.write_text(json.dumps({"cpu": cpu, **snapshot(wd)}, indent=1, sort_keys=True) + "\n")
    return golden


if __name__ == "__main__":
    print(f"wrote {write(Path(sys.argv[1]), reference='--reference' in sys.argv[2:])}")
