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


@pytest.mark.slow
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


def test_every_document_the_repository_names_is_in_it(root):
    """The repository stands alone: a Markdown or reST file named in any tracked file (code
    comments, docs, configs) exists in the repository."""
    import re

    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    present = set(files) | {f.rsplit("/", 1)[-1] for f in files}
    missing = []
    for name in files:
        if name.endswith((".json", ".npy", ".zip", ".png", ".parquet")):
            continue
        text = (root / name).read_text(errors="replace")
        for ref in set(re.findall(r"[\w./-]*\w\.(?:md|rst)\b", text)):
            ref = ref.removeprefix("./")
            if ref not in present and ref.rsplit("/", 1)[-1] not in present:
                missing.append(f"{name}: {ref}")
    assert not missing, missing


def test_config_files_named_in_the_readme_and_the_catalog_exist(root):
    """Every config/*.yaml the README, config/README.md and the workflow catalog name is shipped."""
    import re

    for doc in ("README.md", "config/README.md", ".snakemake-workflow-catalog.yml"):
        for name in set(re.findall(r"config/[\w./-]+\.yaml", (root / doc).read_text())):
            assert (root / name).is_file(), f"{doc} names {name}, which does not exist"
