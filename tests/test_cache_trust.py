"""Caches that cannot mix or rot: the resume key, manifest checks, array checks."""

import dataclasses
import json
import logging
import sys

import numpy as np
import polars as pl
import pytest

import iisan.encoders.cache as cache_mod
import iisan.io as io_mod
from iisan.data.amazon import preprocess
from iisan.data.demo import DemoSpec, generate
from iisan.encoders.backbones import BackboneSpec, build_standin
from iisan.encoders.cache import build_cache, load_cache, prune_cache
from iisan.encoders.cache_files import CacheError, CacheMismatch, read_manifest, set_aside_damaged, verify_cache, write_manifest
from iisan.encoders.cache_job import CacheJob

BERT = dict(source="demo", family="bert", modality="text", layers=2, hidden=16, heads=2, vocab_size=200, max_tokens=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    raw = generate(tmp / "raw", DemoSpec(n_items=60, n_users=80, n_groups=2, n_subgroups=2, image_size=16))
    preprocess(raw["items"], raw["users"], tmp / "ds", images=raw["images"])
    spec = BackboneSpec.from_config("bert-t", BERT)
    build_standin(spec, tmp / "bert", pl.read_parquet(tmp / "ds/items.parquet")["title"].to_list())
    return tmp, spec


def _build(world, out, spec=None, checkpoint_every=20, **settings):
    tmp, base = world
    job = CacheJob.for_spec(spec or base, "title", **settings)
    return build_cache(job, str(tmp / "bert"), tmp / "ds/items.parquet", out, progress=False, checkpoint_every=checkpoint_every)


def _interrupt_after(monkeypatch, batches):
    calls = {"n": 0}
    real = cache_mod.pool_states

    def pool(*a, **kw):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    monkeypatch.setattr(cache_mod, "pool_states", pool)


def test_a_partial_cache_from_other_settings_is_discarded(world, tmp_path, monkeypatch, caplog):
    """Kill a build, change the tokenisation, rebuild: the old rows must not survive."""
    out = tmp_path / "c"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _build(world, out, batch_size=4, checkpoint_every=1)
    assert np.load(out / "cache.done.npy").sum() == 8  # batch 3 was still in flight
    monkeypatch.undo()
    shorter = dataclasses.replace(world[1], max_tokens=5)
    with caplog.at_level(logging.WARNING, logger="iisan.encoders.cache"):
        m = _build(world, out, spec=shorter, batch_size=4)
    assert "discarding the partial cache" in caplog.text and "inputs" in caplog.text
    fresh = _build(world, tmp_path / "fresh", spec=shorter, batch_size=4)
    assert np.array_equal(np.load(out / "cache.npy"), np.load(tmp_path / "fresh/cache.npy"))
    assert m["settings"] == fresh["settings"] and m["settings"]["inputs"]["max_tokens"] == 5
    assert m["checksum"] == fresh["checksum"]


def test_a_partial_cache_resumes_under_equal_settings(world, tmp_path, monkeypatch, caplog):
    out = tmp_path / "c"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _build(world, out, batch_size=4, checkpoint_every=1)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="iisan.encoders.cache"):
        m = _build(world, out, batch_size=4)
    assert "resuming" in caplog.text and "discarding" not in caplog.text
    ref = _build(world, tmp_path / "ref", batch_size=4)
    assert m["checksum"] == ref["checksum"]  # BERT pads to max_tokens: rows do not depend on batching


def test_the_weights_fingerprint_changes_with_the_weights(world, tmp_path):
    tmp, spec = world
    a = cache_mod.weights_fingerprint(str(tmp / "bert"), None)
    assert a == cache_mod.weights_fingerprint(str(tmp / "bert"), None)
    other = tmp_path / "bert2"
    build_standin(spec, other, pl.read_parquet(tmp / "ds/items.parquet")["title"].to_list(), seed=1)
    assert cache_mod.weights_fingerprint(str(other), None) != a
    assert cache_mod.weights_fingerprint("org/model", "abc") == "hub:org/model@abc"


@pytest.fixture()
def good(world, tmp_path):
    out = tmp_path / "c"
    m = _build(world, out, batch_size=16)
    return out, m


def _edit(out, reseal=False, **changes):
    """Change manifest fields; `reseal` recomputes its checksum (as a buggy writer would)."""
    m = json.loads((out / "manifest.json").read_text())
    m.update(changes)
    if reseal:
        write_manifest(out, m)
    else:
        (out / "manifest.json").write_text(json.dumps(m))


def _moved_aside(out):
    return not (out / "cache.npy").exists() and not (out / "manifest.json").exists() \
        and len(list(out.glob("cache.npy.damaged-*"))) == 1 and len(list(out.glob("manifest.json.damaged-*"))) == 1


def _load(out, m, **kw):
    args = dict(backbone="bert-t", layers=[0, 2], item_order_hash=m["item_order_hash"])
    return load_cache(out, **{**args, **kw})


def test_a_sound_cache_loads(good):
    out, m = good
    arr, _ = _load(out, m, pooling="cls", field="title", hidden=16, num_layers=2, dtype="float16")
    assert arr.shape == (m["items"] + 1, 2, 16)
    assert m["checksum"].startswith("xxh3_128:") and m["shape"] == [m["items"] + 1, 3, 16]


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(pooling="mean"), "pooling is 'cls', the experiment asks for 'mean'"),
        (dict(hidden=32), "hidden is 16, the experiment asks for 32"),
        (dict(num_layers=12), "num_layers is 2, the experiment asks for 12"),
        (dict(dtype="float32"), "dtype is 'float16', the experiment asks for 'float32'"),
        (dict(field="image"), "field is 'title', the experiment asks for 'image'"),
        (dict(backbone="bert-base"), "backbone is 'bert-t', the experiment asks for 'bert-base'"),
        (dict(item_order_hash="0000"), "item order hash"),
        (dict(source="bert-base-uncased"), "source is 'demo', the experiment asks for 'bert-base-uncased'"),
        (dict(family="llama"), "family is 'bert', the experiment asks for 'llama'"),
    ],
)
def test_every_field_is_compared_with_the_experiment(good, kw, message):
    out, m = good
    with pytest.raises(CacheMismatch, match=message):
        _load(out, m, **kw)


def test_a_truncated_array_names_the_file_and_is_moved_aside(good):
    out, m = good
    data = (out / "cache.npy").read_bytes()
    (out / "cache.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=rf"{out}/cache.npy: {len(data) // 2} bytes, but field 'bytes'.*moved aside"):
        _load(out, m)
    assert not (out / "cache.npy").exists() and list(out.glob("cache.npy.damaged-*"))


def test_a_changed_byte_fails_the_checksum(good):
    out, m = good
    data = bytearray((out / "cache.npy").read_bytes())
    data[-5] ^= 0xFF
    (out / "cache.npy").write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"cache.npy: content checksum xxh3_128:\w+, but field 'checksum'"):
        _load(out, m)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(stored_layers=[2, 0, 1]), "field 'stored_layers' is \\[2, 0, 1\\], expected strictly increasing"),
        (dict(stored_layers=[0, 1, 5]), "field 'stored_layers'"),
        (dict(hidden=8), "field 'shape' is .*, but items \\+ 1, stored_layers and hidden give"),
        (dict(hidden="16"), "field 'hidden' is '16', expected a JSON int"),
        (dict(dtype="float32"), "array dtype float16, but field 'dtype'"),
        (dict(bytes=12), "bytes, but field 'bytes'"),
    ],
)
def test_an_inconsistent_manifest_names_the_field(good, change, message):
    out, m = good
    _edit(out, reseal=True, **change)
    with pytest.raises(CacheError, match=message) as err:
        verify_cache(out, move_damaged=False)
    assert "manifest.json" in str(err.value)


def test_an_invalid_or_incomplete_manifest_names_the_file(good):
    out, m = good
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[:-20])
    with pytest.raises(CacheError, match=rf"{out}/manifest.json: not valid JSON \(.*line \d+ column \d+"):
        read_manifest(out)
    m.pop("checksum")
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=rf"{out}/manifest.json: field 'checksum' is missing"):
        read_manifest(out)


def _max_tokens(m):
    m["settings"]["inputs"]["max_tokens"] = 20
    m["tokenisation"]["max_tokens"] = 20


@pytest.mark.parametrize("edit", [dict(pooling="mean"), dict(items=59), dict(library_version="0"), _max_tokens],
                         ids=["pooling", "items", "version", "max_tokens"])
def test_any_edit_of_a_manifest_is_detected_and_the_cache_moved_aside(good, edit):
    """Every field is covered by `manifest_checksum`, also those no reader compares."""
    out, m = good
    changed = json.loads((out / "manifest.json").read_text())
    edit(changed) if callable(edit) else changed.update(edit)
    (out / "manifest.json").write_text(json.dumps(changed, indent=2))
    with pytest.raises(CacheError, match=rf"{out}/manifest.json: its fields do not match field 'manifest_checksum'.*moved aside"):
        verify_cache(out, checksum=False)
    assert _moved_aside(out)


def test_the_workflow_sets_aside_an_edited_manifest_before_planning(good, tmp_path):
    """set_aside_damaged (run when Snakemake starts) moves aside a cache whose manifest was edited
    or is not valid JSON, together with its array, so the same run rebuilds it."""
    out, m = good
    pruned = tmp_path / "c" / "pruned-x"
    prune_cache(out, pruned, [0, 2])
    sound = tmp_path / "sound"
    prune_cache(out, sound, [1])
    _edit(out, pooling="mean")
    (pruned / "manifest.json").write_text((pruned / "manifest.json").read_text()[:-10])
    set_aside_damaged(tmp_path)
    assert _moved_aside(out) and _moved_aside(pruned)
    assert verify_cache(sound)["stored_layers"] == [1]


def test_prune_never_copies_an_edited_field(good, tmp_path):
    out, m = good
    _edit(out, pooling="mean")
    with pytest.raises(CacheError, match="manifest_checksum.*moved aside"):
        prune_cache(out, tmp_path / "p", [0, 2])
    assert not (tmp_path / "p" / "manifest.json").exists() and _moved_aside(out)


def test_a_mismatched_pruned_cache_and_its_source_are_moved_aside_for_the_workflow(good, tmp_path):
    """A sound cache of other settings (e.g. a config edited without Snakemake noticing) is moved
    aside with the full cache it was pruned from, so the next run rebuilds both."""
    out, m = good
    pruned = tmp_path / "p"
    prune_cache(out, pruned, [0, 2])
    with pytest.raises(CacheMismatch, match="pooling is 'cls', the experiment asks for 'mean'.*moved aside.*next run rebuilds"):
        _load(pruned, m, pooling="mean", move_mismatched=True)
    assert _moved_aside(pruned) and _moved_aside(out)


def test_a_pruned_cache_lacking_layers_is_moved_aside_but_not_its_source(good, tmp_path):
    out, m = good
    pruned = tmp_path / "p"
    prune_cache(out, pruned, [0])
    with pytest.raises(CacheMismatch, match="layers \\[2\\] are not stored"):
        _load(pruned, m, move_mismatched=True)
    assert _moved_aside(pruned) and (out / "manifest.json").exists() and (out / "cache.npy").exists()


def test_a_cache_build_checks_free_space_first(world, tmp_path, monkeypatch):
    """A memory-mapped array that fills the disk kills the job with SIGBUS; the build stops
    before, naming the file, the bytes it needs and the bytes free."""
    real = io_mod.shutil.disk_usage
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "c"
    with pytest.raises(io_mod.DiskFullError, match=rf"{out}/cache.npy.partial: needs \d+ bytes .*only 1000 bytes .* free"):
        _build(world, out, batch_size=16)
    assert not (out / "cache.npy.partial").exists()


def test_prune_checks_free_space_first(good, tmp_path, monkeypatch):
    out, m = good
    real = io_mod.shutil.disk_usage
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(io_mod.DiskFullError, match=rf"{tmp_path}/p/cache.npy: needs \d+ bytes"):
        prune_cache(out, tmp_path / "p", [0, 2])
    assert not list((tmp_path / "p").iterdir())


def test_prune_checks_its_source_and_records_a_checksum(good, tmp_path):
    out, m = good
    p = prune_cache(out, tmp_path / "p", [0, 2])
    assert p["shape"] == [m["items"] + 1, 2, 16] and p["checksum"] != m["checksum"]
    assert verify_cache(tmp_path / "p")["stored_layers"] == [0, 2]
    with pytest.raises(ValueError, match="strictly increasing"):
        prune_cache(out, tmp_path / "q", [2, 0])
    data = bytearray((out / "cache.npy").read_bytes())
    data[-1] ^= 1
    (out / "cache.npy").write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        prune_cache(out, tmp_path / "r", [0, 2])


def _tree(root):
    """{path: (size, mtime)} of every file and folder under root, Snakemake's own folder aside."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in root.rglob("*") if ".snakemake" not in p.relative_to(root).parts}


def test_a_dry_run_writes_nothing_and_names_a_damaged_cache(tmp_path):
    """`snakemake -n` leaves the tree as it was, a damaged cache included (it is named, not
    moved); a run that executes jobs moves it aside while it builds its graph (the test above)."""
    from conftest import ROOT, copy_workflow, run

    wd = copy_workflow(ROOT, tmp_path)
    cache = wd / "resources/cache/demo/title/bert-demo"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text("{not json")
    (cache / "cache.npy").write_bytes(b"\x93NUMPY")
    before = _tree(wd)
    res = run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "tests/configs/tiny.yaml"], wd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _tree(wd) == before
    assert f"{cache.relative_to(wd)} is damaged" in res.stderr and "a run moves it aside" in res.stderr
