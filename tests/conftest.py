import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
