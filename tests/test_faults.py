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
    """A truncated array is named by a dry run, which moves nothing; a run sets it aside as it
    builds its job graph, and the jobs that read it (here forced: the prune jobs, as after adding
    a LayerDrop scheme) rebuild it first. Snakemake does not rebuild a missing intermediate file
    that no job needs."""
    wd = faulted["faulted"]
    array = wd / "resources/cache/demo/title/bert-demo/cache.npy"
    data = array.read_bytes()
    array.write_bytes(data[: len(data) - 100])  # truncated
    rc, out = _dry_run(wd, "--forcerun", "prune")
    assert rc == 0 and "bert-demo is damaged" in out and "a run moves it aside" in out, out[-3000:]
    assert array.stat().st_size == len(data) - 100 and not list(array.parent.glob("cache.npy.damaged-*"))
    run_to_end(wd, 2, "--forcerun", "prune")
    assert list(array.parent.glob("cache.npy.damaged-*")) and array.read_bytes() == data
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
    aside with its array as a run builds its job graph, so the jobs that need the cache rebuild it
    in that run (here the cache itself is asked for)."""
    import json

    wd = faulted["faulted"]
    folder = wd / "resources/cache/demo/image/vit-demo"
    text = (folder / "manifest.json").read_text()
    edited = json.loads(text)
    edited["pooling"] = "mean" if edited["pooling"] != "mean" else "cls"
    for damaged in (json.dumps(edited, indent=2), text[:-30]):
        (folder / "manifest.json").write_text(damaged)
        res = subprocess.run(SNAKEMAKE + ["--cores", "2", *CONFIG, "--", str(folder.relative_to(wd) / "cache.npy")], cwd=wd,
                             capture_output=True, text=True)
        out = res.stdout + res.stderr
        assert res.returncode == 0 and "manifest.json.damaged-" in out and "rule cache:" in out, out[-3000:]
        assert list(folder.glob("manifest.json.damaged-*")) and list(folder.glob("cache.npy.damaged-*"))
        assert json.loads((folder / "manifest.json").read_text())["pooling"] == json.loads(text)["pooling"]
        assert (folder / "cache.npy").exists()
