"""House style that checks itself: snakefmt and snakemake --lint for the rule files, ruff for the Python."""

import shutil
import subprocess

import pytest


def test_rule_files_are_snakefmt_formatted(root):
    exe = shutil.which("snakefmt")
    if exe is None:
        pytest.fail("snakefmt is not installed (pip install -e '.[test]')")
    res = subprocess.run([exe, "--check", "Snakefile", "workflow/"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout


def test_snakemake_lint_is_clean(root):
    res = subprocess.run([shutil.which("snakemake") or "snakemake", "--lint"], cwd=root, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert "Lints for" not in out, out[-3000:]
    assert "good condition" in out


def test_ruff_is_clean(root):
    """House rules (pyproject.toml [tool.ruff]: line length, imports, unused names, pyupgrade,
    bugbear) hold for the library, the job scripts, the tests and the benchmarks."""
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed (pip install -e '.[test]')")
    res = subprocess.run([exe, "check", "--no-cache", "."], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
