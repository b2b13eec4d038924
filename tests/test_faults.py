"""The fault suite in CI: SIGKILL the workflow while it fetches, caches (mid-array) and trains
(after a checkpoint), rerun after each kill, and check that the outputs equal an uninterrupted
run's (tests/fault_suite.py; `python tests/fault_suite.py --kills 20` for the long version).
Then damage a cache and mistype the config, and check what the workflow does."""

import subprocess

import pytest

from conftest import SNAKEMAKE
from fault_suite import CONFIG, compare, report, run_to_end, suite

KILLS = [
    ("fetch", 0.0),
    ("resources/cache/**/cache.npy.partial", 0.0),  # while a cache array is being written
    ("results/runs/**/checkpoint.pt", 0.0),  # a training run after its first epoch
]

pytestmark = pytest.mark.slow  # Snakemake runs of the whole workflow


@pytest.fixture(scope="module")
def faulted(tmp_path_factory, tiny_workflow):
    return suite(tmp_path_factory.mktemp("faults"), KILLS, reference=tiny_workflow)


def test_killed_workflow_resumes_to_the_same_outputs(faulted):
    print(report(faulted))
    stages = [k.running for k in faulted["kills"]]
    assert "fetch" in stages[0] and "cache" in stages[1] and "train" in stages[2], report(faulted)
    assert not faulted["problems"], report(faulted)
    # the killed training run resumed from its checkpoint instead of starting again
    logs = list((faulted["faulted"] / "logs/train").rglob("*.log.attempts"))
    assert any("resuming" in p.read_text() for p in logs), [p.read_text()[-500:] for p in logs]


def _dry_run(wd, *extra, target="results/table7.csv"):
    res = subprocess.run(SNAKEMAKE + ["-n", *CONFIG, *extra, "--", target], cwd=wd, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def test_a_damaged_cache_is_rebuilt_not_reused(faulted):
    """A truncated array is set aside before the job graph is built; the jobs that read it (here
    forced: the prune jobs, as after adding a LayerDrop scheme) rebuild it first. Snakemake does
    not rebuild a missing intermediate file that no job needs."""
    wd = faulted["faulted"]
    array = wd / "resources/cache/demo/title/bert-demo/cache.npy"
    data = array.read_bytes()
    array.write_bytes(data[: len(data) - 100])  # truncated
    rc, out = _dry_run(wd, "--forcerun", "prune")
    assert rc == 0, out[-3000:]
    assert "rule cache:" in out and "cache.npy.damaged-" in out, out[-3000:]
    assert not array.exists() and list(array.parent.glob("cache.npy.damaged-*"))
    run_to_end(wd, 2, "--forcerun", "prune")
    assert array.read_bytes() == data
    assert not compare(faulted["reference"], wd)


@pytest.mark.parametrize(
    "config,message",
    [
        ("towers=[{field: titel, backbone: bert-demo}]",
         "config key towers[0]: unknown item field 'titel' (item fields: title, image, cover_caption, video_caption)"),
        ("towers=[{field: image, backbone: bert-demo}]", "field 'image' holds image, but backbone 'bert-demo' is a text backbone"),
        ("default_scheme=blocks24", "LayerDrop scheme 'blocks24' cannot be applied to a 12-layer backbone"),
    ],
)
def test_config_mistakes_stop_the_dry_run_with_the_key(faulted, config, message):
    rc, out = _dry_run(faulted["reference"], "--config", config, target="results/table6.csv")
    assert rc != 0 and message in out, out[-3000:]


def test_an_edited_or_invalid_manifest_is_set_aside_before_planning(faulted):
    """A manifest whose fields were edited (here the pooling) or that is not valid JSON is moved
    aside with its array when Snakemake starts, so the jobs that need the cache rebuild it."""
    import json
    import shutil

    wd = faulted["reference"]
    folder = wd / "resources/cache/demo/image/vit-demo"
    keep = wd / "kept-cache"
    shutil.copytree(folder, keep)  # copy2: the mtimes survive, so restoring reruns nothing later
    text = (folder / "manifest.json").read_text()
    edited = json.loads(text)
    edited["pooling"] = "mean" if edited["pooling"] != "mean" else "cls"
    try:
        for damaged in (json.dumps(edited, indent=2), text[:-30]):
            (folder / "manifest.json").write_text(damaged)
            rc, out = _dry_run(wd, "--forcerun", "prune")
            assert rc == 0 and "manifest.json.damaged-" in out and "rule cache:" in out, out[-3000:]
            assert not (folder / "manifest.json").exists() and not (folder / "cache.npy").exists()
            assert list(folder.glob("cache.npy.damaged-*")), list(folder.iterdir())
            shutil.rmtree(folder)
            shutil.copytree(keep, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(keep, folder)
        shutil.rmtree(keep)
