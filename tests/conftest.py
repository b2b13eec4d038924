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
def prompts():
    """The caption prompts the workflow ships (config/prompts/captions.yaml)."""
    from iisan.captions import load_prompts

    return load_prompts(ROOT / "config/prompts/captions.yaml")


@pytest.fixture(scope="session")
def paper_graph():
    """Snakemake's job graph of config/paper.yaml (iisan.pipeline.graph), built once per session."""
    from iisan.pipeline.graph import job_graph

    return job_graph(ROOT, ["config/paper.yaml"])


@pytest.fixture(scope="session")
def demo_graph():
    """Snakemake's job graph of the default (demo) config."""
    from iisan.pipeline.graph import job_graph

    return job_graph(ROOT)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def workflow_config(root: Path = ROOT, *files: str, **overrides) -> dict:
    """The config a run of the Snakefile sees (iisan.pipeline.workflow.workflow_config)."""
    from iisan.pipeline.workflow import workflow_config as load

    return load(root, files, overrides)


def trainer(data=None, run_hash=None, model=None, **train):
    """A Trainer of a tiny cached IISAN run (iisan.data.synthetic's tiny data) on the CPU;
    `model`: model config fields to change."""
    from iisan.data.synthetic import tiny_caches, tiny_data
    from iisan.training.features import CachedFeatures
    from iisan.training.model import ModelConfig
    from iisan.training.train import TrainConfig, Trainer, start_run

    cfg = TrainConfig(**{"batch_size": 16, "max_epochs": 4, "patience": 10, "lr_main": 5e-3, "lr_san": 5e-3,
                         "lr_text_f": 5e-3, "eval_batch": 32, **train})
    device = start_run(cfg.seed, "cpu")
    return Trainer(data or tiny_data(), CachedFeatures(tiny_caches()), ModelConfig(**{"embed_dim": 16, "bottleneck": 8, **(model or {})}), cfg,
                   device,
                   run_hash=run_hash)


def stable(result: dict) -> dict:
    """A run's result without the fields that measure time and memory or say whether it was resumed."""
    from iisan.training.train import MEASURED_FIELDS

    out = {k: v for k, v in result.items() if k not in MEASURED_FIELDS | {"resumed_from_epoch"}}
    out["history"] = [{k: v for k, v in h.items() if k not in MEASURED_FIELDS} for h in result["history"]]
    return out
