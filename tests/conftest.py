import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def copy_workflow(root: Path, dest: Path) -> Path:
    """The workflow's files (not resources/ or results/) copied into `dest`."""
    for name in ("Snakefile", "workflow", "config", "profiles", "envs", "tests"):
        src = root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


def run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local mirror of the authors' Dataset/ folder (CI has it at ../shared/data/amazon)."""
    path = Path(os.environ.get("IISAN_MIRROR", ROOT.parent / "shared" / "data" / "amazon"))
    if not (path / "Scientific").is_dir():
        pytest.skip(f"no Amazon mirror at {path} (set IISAN_MIRROR)")
    return path


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory) -> Path:
    """The whole tiny demo workflow (tests/configs/tiny.yaml), plus the fault suite's mirrored
    dataset, run once per session and shared: the end-to-end test checks it, the fault suite
    and the SLURM test compare their runs with it."""
    from fault_suite import CONFIG, TARGETS, prepare

    wd = prepare(tmp_path_factory.mktemp("tiny") / "wd")
    res = subprocess.run(SNAKEMAKE + ["--cores", "2", *CONFIG, "--config", f"mirror={wd / 'mirror'}", "--", "all", *TARGETS],
                         cwd=wd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return wd


@pytest.fixture(scope="session")
def paper_graph():
    """Snakemake's job graph of config/paper.yaml (iisan.graph), built once per session."""
    from iisan.graph import job_graph

    return job_graph(ROOT, ["config/paper.yaml"])


@pytest.fixture(scope="session")
def demo_graph():
    """Snakemake's job graph of the default (demo) config."""
    from iisan.graph import job_graph

    return job_graph(ROOT)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def workflow_config(root: Path = ROOT, *files: str, **overrides) -> dict:
    """The config a run of the Snakefile sees (iisan.workflow.workflow_config)."""
    from iisan.workflow import workflow_config as load

    return load(root, files, overrides)
