"""The rule files are formatted with snakefmt (pinned in the test extra)."""

import shutil
import subprocess

import pytest


def test_rule_files_are_snakefmt_formatted(root):
    exe = shutil.which("snakefmt")
    if exe is None:
        pytest.fail("snakefmt is not installed (pip install -e '.[test]')")
    res = subprocess.run([exe, "--check", "Snakefile", "workflow/"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
