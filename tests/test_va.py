"""IISAN-VA: decoder backbones, pooling, quantised stand-ins, group LayerDrop, DTL, full vs dropped caches."""

import json

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from iisan.config import Experiment, TowerConfig, TrainConfig
from iisan.data.amazon import preprocess
from iisan.data.demo import DemoSpec, generate
from iisan.encoders.backbones import BackboneSpec, MissingExtra, build_standin, load_backbone
from iisan.encoders.cache import build_cache, prune_cache
from iisan.encoders.cache_job import CacheJob
from iisan.pipeline.plan import va_scheme
from iisan.tables import table_plan
from iisan.training.experiment import run_experiment
from iisan.training.layerdrop import SchemeError, scheme_layers, tower_schemes
from iisan.training.model import ItemEncoder, ModelConfig

from conftest import workflow_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("va")
    raw = generate(tmp / "raw", DemoSpec(n_items=120, n_users=150, n_groups=3, n_subgroups=2, image_size=16))
    preprocess(raw["items"], raw["users"], tmp / "ds", images=raw["images"])
    titles = pl.read_parquet(tmp / "ds/items.parquet")["title"].to_list()
    return tmp, raw, titles


def decoder(name, family="llama", layers=4, hidden=32, **kw):
    entry = dict(source="demo", family=family, modality="text", layers=layers, hidden=hidden, heads=2, vocab_size=300, **kw)
    return BackboneSpec.from_config(name, entry)


@pytest.mark.parametrize(
    "scheme,layers,expected",
    [
        ("stride6", 24, [0, 4, 8, 12, 16, 20, 24]),
        ("stride6", 28, [0, 3, 8, 13, 18, 23, 28]),
        ("stride6", 32, [0, 2, 8, 14, 20, 26, 32]),
        ("stride6", 80, [0, 5, 20, 35, 50, 65, 80]),
        ("eq5-6", 24, [0, 9, 12, 15, 18, 21, 24]),
        ("eq5-6", 80, [0, 15, 28, 41, 54, 67, 80]),
        ("all", 24, list(range(25))),
        ("top", 24, [0] + list(range(13, 25))),
        ("down", 24, [0] + list(range(1, 13))),
        ("even_all", 24, [0] + list(range(2, 25, 2))),
        ("even_top12", 24, [0, 14, 16, 18, 20, 22, 24]),
        ("even_down12", 24, [0, 2, 4, 6, 8, 10, 12]),
        ("top", 12, [0, 7, 8, 9, 10, 11, 12]),
        ("down", 12, [0, 1, 2, 3, 4, 5, 6]),
        ("even_all", 12, [0, 2, 4, 6, 8, 10, 12]),
    ],
)
def test_group_layerdrop_indices(scheme, layers, expected):
    assert scheme_layers(scheme, layers) == expected


def test_va_default_schemes_follow_the_authors_stride():
    cfg = workflow_config()
    assert va_scheme(cfg, "llama3-70b-demo", "vit-demo") == "stride6+blocks6"
    assert va_scheme(cfg, "bert-demo", "vit-demo") == "blocks6"
    assert va_scheme(dict(cfg, va_stride="eq5"), "bert-large-demo", "vit-demo") == "eq5-6+blocks6"
    rows = table_plan("table4", cfg)
    scaling = [f"{t} + {i}" for t, i in cfg["table4"]["image_scaling"]]
    assert [r["label"] for r in rows] == cfg["table4"]["text_encoders"] + scaling
    assert {r["group"] for r in rows} == {"PLM", "base LLM", "MoE LLM", "70B", "image scaling"}
    # ViT-huge's 32 layers do not fit blocks6: both towers keep 6 blocks with the authors' stride
    assert va_scheme(cfg, "bert-demo", "vit-huge-demo") == "stride6"
    assert va_scheme(cfg, "llama3-70b-demo", "vit-large-demo") == "stride6+blocks6"


def test_inapplicable_schemes_name_scheme_and_backbone():
    with pytest.raises(SchemeError, match="'even_top12' needs at least 24 layers, the backbone has 12"):
        scheme_layers("even_top12", 12)
    with pytest.raises(SchemeError, match="'stride13' cannot be applied to a 12-layer backbone"):
        scheme_layers("stride13", 12)
    with pytest.raises(SchemeError, match="names 3 towers, the experiment has 2"):
        tower_schemes("all+all+all", 2)


def test_dtl_shapes_for_every_demo_pair():
    cfg = yaml.safe_load(open("config/config.yaml"))
    bb = cfg["backbones"]
    image = bb[cfg["table4"]["image_encoder"]]
    for text in cfg["table4"]["text_encoders"]:
        t = bb[text]
        k_text = len(scheme_layers(va_scheme(cfg, text, "vit-demo").split("+")[0], t["layers"]))
        k_img = len(scheme_layers("blocks6", image["layers"]))
        enc = ItemEncoder(ModelConfig(heads="va"), [t["hidden"], image["hidden"]], [k_text, k_img])
        out = enc([torch.randn(3, k_text, t["hidden"]), torch.randn(3, k_img, image["hidden"])])
        assert out.shape == (3, 64)
        assert len(enc.inter.blocks) == min(k_text, k_img)
        if t["hidden"] == image["hidden"]:
            assert enc.inter.map_a is None and enc.inter.map_b is None
        else:
            assert len(enc.inter.map_a) == len(enc.inter.blocks)
            assert all((m.proj.in_features, m.proj.out_features) == (t["hidden"], image["hidden"]) for m in enc.inter.map_a)
        assert enc.heads[0].F.out_features == 64 and enc.heads[0].P.in_features == 64  # VA heads


@pytest.mark.parametrize("method", ["iisan-va", "iisan"])
def test_va_heads_keep_the_default_init_for_the_image_projection(method):
    """Code_Cached_Asym/model/model.py draws cv_pre_fc = nn.Linear(64, 64) (PyTorch's default:
    U(-1/sqrt(64), 1/sqrt(64)) weights and biases), where the symmetric code reuses ViT's Xavier
    classifier; so the VA image head's P is default-initialised, for IISAN-VS with VA heads too."""
    import math

    torch.manual_seed(0)
    enc = ItemEncoder(ModelConfig(method=method, heads="va"), [96, 48], [7, 7])
    bound = 1 / math.sqrt(64)
    for head in enc.heads:
        assert head.P.weight.abs().max().item() <= bound and head.P.bias.detach().any()
        assert head.P.bias.abs().max().item() <= bound
    # Xavier-normal would have std sqrt(2 / (64 + 64)) = 0.125; the default's is bound / sqrt(3) = 0.072
    assert abs(enc.heads[1].P.weight.std().item() - bound / math.sqrt(3)) < 0.006


def test_decoder_pooled_three_ways(demo):
    tmp, _, titles = demo
    spec = decoder("llama-tiny", initializer_range=0.2)
    build_standin(spec, tmp / "llama", titles)
    arrays = {}
    for pooling in ("mean", "masked_mean", "last"):
        spec.pooling = pooling
        build_cache(CacheJob.for_spec(spec, "title", store_dtype="float32"), str(tmp / "llama"), tmp / "ds/items.parquet",
                    tmp / f"c-{pooling}", progress=False)
        arrays[pooling] = np.load(tmp / f"c-{pooling}/cache.npy")
        assert json.loads((tmp / f"c-{pooling}/manifest.json").read_text())["pooling"] == pooling
    assert not np.allclose(arrays["mean"], arrays["masked_mean"])
    assert not np.allclose(arrays["masked_mean"], arrays["last"])
    # masked mean against a manual computation for item 1
    model, tok = load_backbone(spec, str(tmp / "llama"), torch.device("cpu"))
    title = pl.read_parquet(tmp / "ds/items.parquet")["title"][0]
    ids = tok(title, max_length=30, truncation=True)["input_ids"]
    assert ids[0] == tok.bos_token_id
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    manual = torch.stack([h[0].mean(0) for h in hs]).numpy()
    assert np.allclose(arrays["masked_mean"][1], manual, atol=1e-4)
    assert np.allclose(arrays["last"][1], torch.stack([h[0, -1] for h in hs]).numpy(), atol=1e-4)
    # the authors' unmasked mean: pad to 30 with id 0, no attention mask, average all positions
    padded = ids + [0] * (30 - len(ids))
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([padded]), output_hidden_states=True).hidden_states
    assert np.allclose(arrays["mean"][1], torch.stack([h[0].mean(0) for h in hs]).numpy(), atol=1e-4)


def test_four_bit_standin_cached_end_to_end(demo):
    tmp, _, titles = demo
    spec = decoder("llama-4bit", layers=6, hidden=64, pooling="mean", quantization="bnb-4bit")
    build_standin(spec, tmp / "q4", titles)
    cfg = json.loads((tmp / "q4/config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True  # stored quantised
    model, _ = load_backbone(spec, str(tmp / "q4"), torch.device("cpu"))
    assert type(model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    m = build_cache(CacheJob.for_spec(spec, "title"), str(tmp / "q4"), tmp / "ds/items.parquet", tmp / "c-q4", progress=False)
    arr = np.load(tmp / "c-q4/cache.npy")
    assert arr.shape == (m["items"] + 1, 7, 64) and arr.dtype == np.float16 and np.isfinite(arr).all()
    assert m["quantization"] == "bnb-4bit" and m["bytes"] == (tmp / "c-q4/cache.npy").stat().st_size


def test_caching_resumes_after_an_interruption(demo, monkeypatch):
    tmp, _, titles = demo
    spec = decoder("llama-resume", pooling="masked_mean")
    build_standin(spec, tmp / "resume", titles)
    cache_job = CacheJob.for_spec(spec, "title", batch_size=16)
    full = build_cache(cache_job, str(tmp / "resume"), tmp / "ds/items.parquet", tmp / "c-ref", progress=False)
    import iisan.encoders.cache as cache_mod

    calls = {"n": 0}
    real_pool = cache_mod.pool_states

    def failing_pool(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real_pool(*a, **kw)

    monkeypatch.setattr(cache_mod, "pool_states", failing_pool)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cache_job, str(tmp / "resume"), tmp / "ds/items.parquet", tmp / "c-res", progress=False, checkpoint_every=2)
    assert not (tmp / "c-res/cache.npy").exists()
    # the 5th batch failed; the record of finished items is written every 2 batches
    assert np.load(tmp / "c-res/cache.done.npy").sum() == 2 * 16
    calls["n"] = -100  # no more failures; count the batches of the resumed run
    build_cache(cache_job, str(tmp / "resume"), tmp / "ds/items.parquet", tmp / "c-res", progress=False, checkpoint_every=2)
    n_batches = -(-full["items"] // 16)
    assert calls["n"] + 100 == n_batches - 2  # only the batches not recorded as finished ran
    assert np.allclose(np.load(tmp / "c-res/cache.npy"), np.load(tmp / "c-ref/cache.npy"), atol=2e-3)


def test_missing_gptq_extra_names_it(demo):
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("the gptq extra is installed here")
    tmp, _, titles = demo
    spec = decoder("llama-gptq", quantization="gptq")
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[gptq\]'.*envs/gptq.yaml"):
        build_standin(spec, tmp / "gptq", titles)
    with pytest.raises(MissingExtra, match="gptqmodel is not installed"):
        load_backbone(spec, str(tmp / "nowhere"), torch.device("cpu"))


def test_full_and_dropped_cache_give_identical_metrics(demo):
    tmp, raw, titles = demo
    text = decoder("llama-va", layers=8, hidden=48, pooling="mean", initializer_range=0.2)
    image = BackboneSpec.from_config("vit-va", dict(source="demo", family="vit", modality="image", layers=4, hidden=32, image_size=16, patch_size=8))
    dirs = {}
    for spec, field in ((text, "title"), (image, "image")):
        build_standin(spec, tmp / spec.name, titles)
        build_cache(CacheJob.for_spec(spec, field), str(tmp / spec.name), tmp / "ds/items.parquet", tmp / f"full-{spec.name}",
                    images_archive=raw["images"], progress=False)
        dirs[spec.name] = tmp / f"full-{spec.name}"
    towers = [TowerConfig("title", "llama-va", {"source": "demo", "family": "llama", "modality": "text", "layers": 8,
                                                "hidden": 48, "pooling": "mean"}),
              TowerConfig("image", "vit-va", {"source": "demo", "family": "vit", "modality": "image", "layers": 4,
                                              "hidden": 32})]

    def exp(cache):
        return Experiment("ds", towers, "iisan-va", "stride2+blocks2", cache, True, "float16",
                          model=ModelConfig(method="iisan-va", heads="va"),
                          train=TrainConfig(max_epochs=2, patience=2, batch_size=32, seed=7))

    prune_cache(dirs["llama-va"], tmp / "drop-t", scheme_layers("stride2", 8))
    prune_cache(dirs["vit-va"], tmp / "drop-i", scheme_layers("blocks2", 4))
    a = run_experiment(exp("full"), tmp / "ds", [dirs["llama-va"], dirs["vit-va"]], tmp / "full.json")
    b = run_experiment(exp("dropped"), tmp / "ds", [tmp / "drop-t", tmp / "drop-i"], tmp / "dropped.json")
    assert a["layers"] == b["layers"] == [[0, 1, 8], [0, 2, 4]]  # authors stride k = (8-1)//(2-1) = 7
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["caches"][0]["bytes"] > b["caches"][0]["bytes"]
