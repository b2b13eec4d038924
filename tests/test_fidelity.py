"""Defaults that follow the authors' code (GAIR-Lab/IISAN `Code_Cached`), checked one by one."""

import math

import torch
from torch import nn

from iisan.layerdrop import scheme_layers
from iisan.model import ItemEncoder, ModelConfig, TransformerBlock, UserEncoder
from iisan.plan import table_plan, va_scheme

from conftest import workflow_config


def test_user_encoder_ffn_has_no_dropout_between_relu_and_w2():
    """`dropout(w_2(relu(w_1(x))))`: one dropout after the attention output, one after W2."""
    block = TransformerBlock(16, 2, dropout=0.5).train()
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x

    block.drop = Record()
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 1, 5, 5)
    block(x, mask)
    assert len(seen) == 2
    h = block.ln1(x + seen[0])
    torch.testing.assert_close(seen[1], block.ff2(torch.relu(block.ff1(h))))


def test_qkv_is_drawn_as_three_linears_and_every_user_encoder_linear_is_xavier():
    """The authors' w_Q, w_K, w_V are three Linear(D, D) with Xavier-normal weights (std
    sqrt(2 / (D + D))); our fused Linear(D, 3D) is drawn the same way, part by part."""
    torch.manual_seed(0)
    D = 64
    enc = UserEncoder(ModelConfig(embed_dim=D, n_blocks=8))
    qkv = torch.stack([b.qkv.weight.detach() for b in enc.blocks])  # (8, 3D, D)
    for part in qkv.chunk(3, dim=1):
        assert abs(part.std().item() - math.sqrt(2 / (D + D))) < 0.004
    ff1 = torch.stack([b.ff1.weight.detach() for b in enc.blocks])
    assert abs(ff1.std().item() - math.sqrt(2 / (D + 4 * D))) < 0.004
    assert all(not b.ff1.bias.detach().any() and not b.ff2.bias.detach().any() for b in enc.blocks)


def test_image_head_p_is_xavier_with_zero_bias():
    """The authors' image projection is ViT's replaced classifier, Linear(d, 64), Xavier-normal
    with a zero bias; the text one keeps PyTorch's default."""
    torch.manual_seed(0)
    d = 768
    enc = ItemEncoder(ModelConfig(), [d, d], [7, 7])
    text, image = enc.heads
    assert not image.P.bias.detach().any() and text.P.bias.detach().any()
    assert abs(image.P.weight.std().item() - math.sqrt(2 / (d + 64))) < 0.003
    bound = 1 / math.sqrt(d)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert text.P.weight.abs().max().item() <= bound


def test_va_text_tower_keeps_as_many_blocks_as_the_image_tower():
    cfg = workflow_config()
    for image in ("vit-demo", "vit-large-demo"):
        for text in ("bert-demo", "bert-large-demo", "llama3-8b-demo", "llama3-70b-demo"):
            scheme = va_scheme(cfg, text, image)
            text_scheme, image_scheme = scheme.split("+") if "+" in scheme else (scheme, scheme)
            n_image = len(scheme_layers(image_scheme, cfg["backbones"][image]["layers"], include_h0=False))
            n_text = len(scheme_layers(text_scheme, cfg["backbones"][text]["layers"], include_h0=False))
            assert n_text == n_image == 6, (text, image, text_scheme, image_scheme)


def test_inter_head_is_d_to_d_to_64_for_va_too():
    """Code_Cached_Asym: fc_mm Linear(d, d), then fc_mm_down Linear(d, 64), d the narrower width."""
    enc = ItemEncoder(ModelConfig(method="iisan-va", heads="va"), [96, 48], [7, 7])
    h = enc.inter_head
    assert (h.F.in_features, h.F.out_features, h.P.in_features, h.P.out_features) == (48, 48, 48, 64)
    assert enc.heads[0].F.out_features == 64  # the intra heads stay VA heads


def test_table4_runs_iisan_vs_where_the_backbones_have_one_shape():
    cfg = workflow_config()
    rows = {r["label"]: r for r in table_plan("table4", cfg)}
    assert rows["bert-demo"]["method"] == "iisan" and rows["bert-demo"]["scheme"] == "blocks6"
    assert all(r["method"] == "iisan-va" for label, r in rows.items() if label != "bert-demo")


def test_fp16_storage_refuses_states_beyond_its_range(tmp_path, monkeypatch):
    """A state float16 cannot hold stops the build naming backbone and layer (no inf stored);
    float32 storage keeps it."""
    import numpy as np
    import polars as pl
    import pytest

    import iisan.cache as cache_mod
    from iisan.backbones import BackboneSpec, build_standin
    from iisan.data.amazon import preprocess
    from iisan.data.demo import DemoSpec, generate

    raw = generate(tmp_path / "raw", DemoSpec(n_items=40, n_users=30, n_groups=2, n_subgroups=2, image_size=8))
    preprocess(raw["items"], raw["users"], tmp_path / "ds", images=raw["images"])
    spec = BackboneSpec.from_config("b", {"source": "demo", "family": "bert", "modality": "text", "layers": 4, "hidden": 16,
                                          "heads": 2, "vocab_size": 200})
    build_standin(spec, tmp_path / "b", pl.read_parquet(tmp_path / "ds/items.parquet")["title"].to_list())
    real = cache_mod.pool_states

    def huge_h3(states, pooling, mask):
        out = real(states, pooling, mask)
        out[:, 3] *= 1e6
        return out

    monkeypatch.setattr(cache_mod, "pool_states", huge_h3)
    with pytest.raises(ValueError, match=r"backbone b: hidden states h\[3\] hold values beyond the float16 range"):
        cache_mod.build_cache(spec, str(tmp_path / "b"), tmp_path / "ds/items.parquet", "title", tmp_path / "c16",
                              store_dtype="float16", progress=False)
    assert not (tmp_path / "c16/cache.npy").exists()
    cache_mod.build_cache(spec, str(tmp_path / "b"), tmp_path / "ds/items.parquet", "title", tmp_path / "c32",
                          store_dtype="float32", progress=False)
    arr = np.load(tmp_path / "c32/cache.npy")
    assert np.isfinite(arr).all() and np.abs(arr[1:, 3]).max() > 65504


def test_table8_has_the_papers_22_rows_and_three_group_means(tmp_path):
    import json

    from iisan.tables import build_table

    cfg = workflow_config()
    rows = table_plan("table8", cfg)
    groups = [r["group"] for r in rows]
    assert groups == ["24+12"] + ["12+12"] * 3 + ["12+6"] * 9 + ["6+6"] * 9
    assert len({(r["text"], r["image"]) for r in rows}) == 22
    paths = []
    for i, row in enumerate(rows):
        row["dataset"] = "demo"
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"test": {"hr@10": i / 100, "ndcg@10": i / 200}, "trainable_params": 1, "best_epoch": 1,
                                         "time_per_epoch_train_s": 1.0, "peak_memory_mb": 1.0, "peak_memory_kind": "x"}))
    df = build_table("table8", rows, paths, tmp_path / "t8.csv")
    means = df.filter(df["selection"].str.starts_with("mean"))
    assert means["selection"].to_list() == ["mean (12+12)", "mean (12+6)", "mean (6+6)"]
    assert means["hr@10"].to_list() == [2.0, 8.0, 17.0]  # rows 1-3, 4-12, 13-21 in percent
