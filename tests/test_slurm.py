"""The README's cluster commands, run as written against the rehearsal through a real SLURM declared
as a GPU cluster's node (tests/slurm/start.sh: slurmctld, slurmd and munge on localhost, 8 fake
GPUs as gres, 64 CPUs, 512 GB, a `cpu` and a `gpu` partition with time limits), with the paper's
own requests: no resource overrides. Needs root (CI runs as root); the daemons are started and
stopped here."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_workflow, run

ROOT = Path(__file__).resolve().parents[1]
needs_slurm = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None and shutil.which("slurmctld") is None,
                                 reason="a local SLURM needs root and Debian's slurm-wlm/munge")
GPU_RULES = {"caption", "cache", "train", "profile"}
TABLE = "results/table7.csv"  # the target the submission and the report are given here: one table of the paper
# How the suite runs the README's commands, and nothing else: the rehearsal's config after the
# paper's; conda environments are not built (no conda channel is reachable from the test machine:
# tests/test_envs.py builds them through Snakemake's own code); the whole paper's commands (no
# target) are given one table; the plugin polls SLURM every few seconds instead of after 40 s.
SKIP = ("python3 -m venv", "--conda-create-envs-only")
POLL = ["--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "5"]


def readme_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """The shell commands of the README's "Reproducing the paper" section, in order: every
    fenced bash block of the section, one command a block."""
    text = readme.read_text()
    section = text[text.index("## Reproducing the paper"):]
    section = section[:section.index("\n## ", 1)]
    section = section[:section.index("### ")] if "### " in section else section
    return [" ".join(b.replace("\\\n", " ").split()) for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def rehearsed(command: str) -> list[str] | None:
    """A README command as the suite runs it (see SKIP, POLL and TABLE), or None if skipped."""
    if any(s in command for s in SKIP):
        return None
    args = shlex.split(command.replace("config/paper.yaml", "config/paper.yaml config/rehearsal.yaml"))
    args = [a for i, a in enumerate(args) if not (a == "--sdm" or (i and args[i - 1] == "--sdm"))]
    if args[0] == "snakemake":
        args[0:1] = [sys.executable, "-m", "snakemake"]
        if "--workflow-profile" in args:
            args[args.index("--workflow-profile"):args.index("--workflow-profile")] = POLL
        if "--" not in args:
            args += ["--", TABLE]
    return args


def test_readme_section_has_every_step():
    cmds = readme_commands()
    assert len(cmds) == 7, cmds
    fetch, envs, price, submit, again, report = cmds[1:]
    assert fetch.endswith("-- fetch") and "--keep-going" in fetch
    assert "--conda-create-envs-only" in envs and price.startswith("iisan plan")
    assert "--workflow-profile profiles/slurm" in submit and "--" not in shlex.split(submit)
    assert again.split("--forcerun ")[1].startswith("results/runs/") and "--report" in report


def test_the_slurm_profile_sends_gpu_rules_to_the_gpu_partition_and_the_rest_to_the_cpu_one(root):
    """Every rule that declares `gpu` is listed under the profile's set-resources with the GPU
    partition, and nothing else is: a new GPU rule cannot queue on the CPU partition unnoticed."""
    profile = yaml.safe_load((root / "profiles/slurm/config.yaml").read_text())
    gpu_part = {r: v["slurm_partition"] for r, v in profile["set-resources"].items()}
    assert set(gpu_part) == GPU_RULES and len(set(gpu_part.values())) == 1
    assert profile["default-resources"]["slurm_partition"] not in gpu_part.values()
    declares = set()
    for smk in (root / "workflow/rules").glob("*.smk"):
        for block in re.split(r"^(?=rule |use rule )", smk.read_text(), flags=re.M)[1:]:
            name = re.match(r"(?:use rule \S+ as |rule )(\w+)", block).group(1)
            if re.search(r"^\s+gpu=", block, re.M):
                declares.add(name)
    assert declares == GPU_RULES


def test_rehearsed_commands():
    assert rehearsed("python3 -m venv .venv && pip install torch") is None
    assert rehearsed("snakemake --workflow-profile profiles/slurm --sdm conda --configfile config/paper.yaml")[3:] == [
        "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "5",
        "--workflow-profile", "profiles/slurm", "--configfile", "config/paper.yaml", "config/rehearsal.yaml", "--", TABLE]


@pytest.fixture
def cluster(root, tmp_path):
    state = tmp_path / "slurm-state"
    res = subprocess.run(["bash", str(root / "tests/slurm/start.sh"), str(state)], capture_output=True, text=True)
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(root / "tests/slurm/stop.sh"), str(state)], capture_output=True)


@pytest.mark.slow
@needs_slurm
def test_readme_cluster_commands_run_as_written(root, tmp_path, cluster):
    """Fetch on the submit host, price, submit through the test cluster, rerun one experiment and
    report: each command of the README's section, in order; every SLURM job got the partition,
    CPUs, memory, runtime and cards it asked for (tests/slurm/audit.py)."""
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail("the SLURM executor plugin is not installed (pip install -e '.[test]')")
    (tmp_path / "wd").mkdir()
    wd = copy_workflow(root, tmp_path / "wd")
    env = {**cluster, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster['PATH']}"}
    ran = []
    for command in readme_commands():
        args = rehearsed(command)
        if args is None:
            continue
        res = run(args, wd, env=env, timeout=1500)
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"{command}\n{out[-6000:]}"
        ran.append((command, out))
    assert len(ran) == 5
    fetch, price, submit, again, report = (out for _, out in ran)
    assert "card-hours" in price and "wall time on 8 GPUs" in price
    assert (wd / TABLE).exists() and (wd / "report.html").exists()
    run_file = ran[3][0].split("--forcerun ")[1].split()[0]
    assert "Finished jobid" in again and (wd / run_file).exists()
    assert (wd / TABLE).stat().st_mtime >= (wd / run_file).stat().st_mtime  # the rerun rebuilt the table it feeds
    submitted = re.findall(r"has been submitted with SLURM jobid", submit)
    assert len(submitted) >= 10, submit[-3000:]
    audits = []
    for log in sorted((wd / ".snakemake/log").glob("*.snakemake.log")):
        if "has been submitted with SLURM jobid" in log.read_text():
            audit = run([sys.executable, str(root / "tests/slurm/audit.py"), str(log)], wd, env=cluster, timeout=300)
            assert audit.returncode == 0, audit.stdout + audit.stderr
            audits.append(audit.stdout)
    assert len(audits) == 2, audits  # the submission and the rerun
    # GPU jobs on the GPU partition with a card each, CPU jobs on the CPU partition with none
    assert re.search(r"^train\s+\d+\s+gpu\s+1\s+\S+\s+\S+\s+1\s", audits[0], re.M), audits[0]
    assert re.search(r"^cache\s+\d+\s+gpu\s+\S+\s+\S+\s+\S+\s+1\s", audits[0], re.M), audits[0]
    assert re.search(r"^prune\s+\d+\s+cpu\s+1\s+\S+\s+\S+\s+0\s", audits[0], re.M), audits[0]
    assert re.search(r"^train\s+1\s+gpu\s", audits[1], re.M), audits[1]
