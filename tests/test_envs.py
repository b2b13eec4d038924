"""The conda environments (envs/*.yaml) build where Snakemake builds them.

Snakemake creates an environment from a copy of its file in <conda prefix>/<hash>.yaml, so the
files hold no path; each one's post-deploy script (envs/<env>.post-deploy.sh) installs the library
from the repository. The scripts are run here through Snakemake's own `Env.create`, with only the
conda commands stood in for: `conda env create` makes a venv, and activation puts its bin/ first
on PATH. No conda and no network are needed.
"""

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from snakemake.deployment import conda
from snakemake.exceptions import CreateCondaEnvironmentException
from snakemake.shell import shell

ROOT = Path(__file__).resolve().parents[1]
# each environment and the pyproject.toml extra its post-deploy script installs
ENVS = {"iisan": "workflow", "gptq": "gptq"}


def pip_requirements(env: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "envs" / f"{env}.yaml").read_text())
    pips = [dep["pip"] for dep in spec["dependencies"] if isinstance(dep, dict) and "pip" in dep]
    return [line for part in pips for line in part]


@pytest.mark.parametrize("env", ENVS)
def test_env_file_holds_no_path(env):
    """Every pip line is a requirement (name, extras, version), never a path: pip would read one
    relative to the copy of the file Snakemake creates the environment from."""
    reqs = pip_requirements(env)
    assert reqs, f"envs/{env}.yaml has no pip part"
    for line in reqs:
        assert ".." not in line and "/" not in line and not line.startswith(("-e", ".", "file:")), line
        Requirement(line)  # raises on anything but a requirement


@pytest.mark.parametrize("env", ENVS)
def test_post_deploy_script_installs_an_existing_extra(env):
    """Each environment file has its post-deploy script beside it, executable, with an interpreter
    line (Snakemake runs it with that interpreter); the extra it installs is in pyproject.toml;
    the two scripts differ only in the environment and extra they name."""
    script = ROOT / "envs" / f"{env}.post-deploy.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and os.access(script, os.X_OK)
    assert f"\nextra={ENVS[env]}  #" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert ENVS[env] in extras
    other = (ROOT / "envs" / "iisan.post-deploy.sh").read_text()
    differ = [(a, b) for a, b in zip(text.splitlines(), other.splitlines(), strict=True) if a != b]
    assert all("envs/iisan.yaml" in b or b.startswith("extra=") for _, b in differ), differ


class FakeConda:
    """Conda as Snakemake's Env uses it: `activate` puts the environment's bin/ first on PATH."""

    platform = "linux-64"

    def shellcmd(self, env_address, cmd):
        return f"PATH='{env_address}/bin':\"$PATH\"; export PATH; unset PYTHONHOME CONDA_PREFIX; {cmd}"


class Persistence:
    def __init__(self, path: Path):
        self.conda_env_path = str(path / "conda")
        os.makedirs(self.conda_env_path, exist_ok=True)  # as Snakemake's persistence makes it
        self.conda_env_archive_path = str(path / "conda-archive")


class SourceCache:
    def open(self, source, mode="r"):
        return open(source.get_path_or_uri(secret_free=True), mode)

    def exists(self, source):
        return os.path.exists(source.get_path_or_uri(secret_free=True))


class Workflow:
    """The parts of a Snakemake workflow that conda.Env reads."""

    def __init__(self, path: Path):
        self.persistence = Persistence(path)
        self.sourcecache = SourceCache()
        self.deployment_settings = type("DeploymentSettings", (), {"apptainer_args": ""})()
        self.runtime_paths = []


def stub_python(prefix: Path) -> None:
    """An environment whose `python` logs its working directory and arguments to prefix/calls."""
    (prefix / "bin").mkdir(parents=True)
    python = prefix / "bin" / "python"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$PWD\" \"$@\" '--' >> '{prefix}/calls'\necho '{prefix}'\n")
    python.chmod(0o755)


def venv_python(prefix: Path) -> None:
    """A venv without pip of its own: the workflow venv's site-packages (pip, setuptools, the
    library's dependencies) are on its path through a .pth file, which adds that folder without
    reading its own .pth files, so the library's editable install there stays out of sight."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    site = next((prefix / "lib").glob("python3.*/site-packages"))
    (site / "workflow-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def create(name, tmp_path, monkeypatch, make_env=stub_python) -> Path:
    """Snakemake's Env.create for envs/<name>.yaml with the conda prefix in tmp_path, from the
    current working directory; `conda env create` runs make_env on the prefix. The prefix."""
    real = shell.check_output

    def check_output(cmd, **kwargs):
        if cmd.startswith("conda env create"):
            make_env(Path(cmd.split("--prefix ")[1].split()[0].strip('"')))
            return ""
        return real(cmd, **kwargs)

    monkeypatch.setattr(shell, "check_output", check_output)
    env = conda.Env(Workflow(tmp_path), env_file=str(ROOT / "envs" / f"{name}.yaml"))
    env._conda = FakeConda()
    prefix = Path(env.create())
    assert prefix.parent == tmp_path / "conda"
    # the script ran from Snakemake's copy beside the environment, not from envs/
    assert Path(f"{prefix}.post-deploy.sh").read_bytes() == (ROOT / "envs" / f"{name}.post-deploy.sh").read_bytes()
    assert conda.get_env_setup_done_flag_file(prefix).exists()
    return prefix


def pip_calls(prefix: Path) -> list[list[str]]:
    """The stub python's pip calls: [working directory, args...] each."""
    calls = (prefix / "calls").read_text().split("--\n")
    return [c.splitlines() for c in calls if "pip" in c.splitlines()]


@pytest.mark.parametrize("env", ENVS)
def test_post_deploy_from_the_repository_root(env, tmp_path, monkeypatch):
    """Snakemake run from the repository root (as the README does), the prefix elsewhere."""
    monkeypatch.delenv("IISAN_WORKFLOW_DIR", raising=False)
    monkeypatch.chdir(ROOT)
    prefix = create(env, tmp_path, monkeypatch)
    assert pip_calls(prefix) == [[str(ROOT), "-m", "pip", "install", "--no-input", "-e", f"{ROOT}[{ENVS[env]}]"]]


def test_post_deploy_from_a_folder_in_the_repository(tmp_path, monkeypatch):
    """`--directory` a folder inside the repository: the script finds the repository above it."""
    monkeypatch.delenv("IISAN_WORKFLOW_DIR", raising=False)
    monkeypatch.chdir(ROOT / "workflow" / "rules")
    prefix = create("iisan", tmp_path, monkeypatch)
    assert pip_calls(prefix)[0][-1] == f"{ROOT}[workflow]"


def test_post_deploy_from_elsewhere_with_the_variable(tmp_path, monkeypatch):
    """`--directory` outside the repository: IISAN_WORKFLOW_DIR names it."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("IISAN_WORKFLOW_DIR", str(ROOT))
    prefix = create("gptq", tmp_path, monkeypatch)
    assert pip_calls(prefix)[0][-1] == f"{ROOT}[gptq]"


def test_post_deploy_without_the_repository_says_what_to_do(tmp_path, monkeypatch):
    """Outside the repository and without IISAN_WORKFLOW_DIR (another project's pyproject.toml
    above does not count), creation fails naming both ways out, and Snakemake removes the half-made
    environment, so the next run tries again; a wrong IISAN_WORKFLOW_DIR is named as such."""
    other = tmp_path / "other"
    (other / "src" / "iisan").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "other"\n')
    (other / "work").mkdir()
    monkeypatch.chdir(other / "work")
    monkeypatch.delenv("IISAN_WORKFLOW_DIR", raising=False)
    with pytest.raises(CreateCondaEnvironmentException) as err:
        create("iisan", tmp_path, monkeypatch)
    message = str(err.value)
    assert "cannot find the iisan-versa repository" in message and str(other / "work") in message
    assert "Run snakemake from the repository root, or export IISAN_WORKFLOW_DIR=" in message
    assert not any((tmp_path / "conda").glob("*/bin"))

    monkeypatch.setenv("IISAN_WORKFLOW_DIR", str(other))
    with pytest.raises(CreateCondaEnvironmentException, match=f"IISAN_WORKFLOW_DIR={other} is not the iisan-versa repository"):
        create("iisan", tmp_path, monkeypatch)


@pytest.mark.slow
def test_post_deploy_installs_the_library_from_the_repository(tmp_path, monkeypatch):
    """The real install, offline: Snakemake's Env.create runs envs/iisan.post-deploy.sh in a venv,
    pip told (through its PIP_* variables, as a site would set a mirror) to use no index, no build
    isolation and no dependencies; `import iisan` in the environment is then the repository's
    src/iisan, installed editable into the environment itself."""
    monkeypatch.delenv("IISAN_WORKFLOW_DIR", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_DEPS", "1")
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip reads this one inverted: 0 = off
    monkeypatch.chdir(ROOT)
    prefix = create("iisan", tmp_path, monkeypatch, make_env=venv_python)
    probe = "import importlib.metadata as m, iisan; print(iisan.__file__); print(m.distribution('iisan-versa')._path)"
    out = subprocess.run([prefix / "bin" / "python", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    module, dist = out.stdout.splitlines()
    assert Path(module) == ROOT / "src" / "iisan" / "__init__.py"
    assert Path(dist).is_relative_to(prefix), dist


def test_env_pins_resolve_offline(tmp_path):
    """The pinned pip requirements of the environment files resolve from the wheels on this
    machine (pip's configured find-links, no index); skipped for a package with no local wheel
    at any version."""

    def dry_run(requirement):
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--no-index"]
        return subprocess.run([*cmd, "--report", str(tmp_path / "report.json"), requirement], capture_output=True, text=True)

    for line in sorted({line for env in ENVS for line in pip_requirements(env)}):
        res = dry_run(line)
        if res.returncode != 0 and dry_run(name := Requirement(line).name).returncode != 0:
            pytest.skip(f"no local wheel of {name}")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
