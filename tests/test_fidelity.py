"""Defaults that follow the authors' code (GAIR-Lab/IISAN `Code_Cached`), checked one by one."""

import math

import torch
from torch import nn

from iisan.config import TrainConfig
from iisan.pipeline.plan import va_scheme
from iisan.tables import table_plan
from iisan.training.layerdrop import scheme_layers
from iisan.training.model import ItemEncoder, ModelConfig, OutputHead, Recommender, TransformerBlock, UserEncoder

from conftest import ROOT, workflow_config


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

    import iisan.encoders.cache as cache_mod
    from iisan.data.amazon import preprocess
    from iisan.data.demo import DemoSpec, generate
    from iisan.encoders.backbones import BackboneSpec, build_standin
    from iisan.encoders.cache_job import CacheJob

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
        cache_mod.build_cache(CacheJob.for_spec(spec, "title", store_dtype="float16"), str(tmp_path / "b"),
                              tmp_path / "ds/items.parquet", tmp_path / "c16", progress=False)
    assert not (tmp_path / "c16/cache.npy").exists()
    cache_mod.build_cache(CacheJob.for_spec(spec, "title", store_dtype="float32"), str(tmp_path / "b"),
                          tmp_path / "ds/items.parquet", tmp_path / "c32", progress=False)
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


def test_baseline_heads_are_gelu_of_one_linear_at_the_main_rate():
    """Code_Uncached: GELU(fc(h)) per modality on the output state ([CLS] of BERT's last hidden
    state; ViT's classifier on its final LayerNorm), the image Linear Xavier with a zero bias, the
    text one PyTorch's default, both with the user encoder at the main learning rate; then
    com_dense over [image; text]."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    d = 768
    for method in ("fft", "adapter", "lora", "bitfit", "frozen"):
        enc = ItemEncoder(ModelConfig(method=method), [d, d], [1, 1])
        text, image = enc.heads
        assert isinstance(text, OutputHead) and isinstance(image, OutputHead)
        assert (text.proj.in_features, text.proj.out_features) == (d, 64)
        assert not image.proj.bias.detach().any() and text.proj.bias.detach().any()
        assert abs(image.proj.weight.std().item() - math.sqrt(2 / (d + 64))) < 0.003
        assert text.proj.weight.abs().max().item() <= 1 / math.sqrt(d)
        x_t, x_i = torch.randn(5, 1, d), torch.randn(5, 1, d)
        want = enc.fusion(torch.cat([F.gelu(image.proj(x_i[:, 0])), F.gelu(text.proj(x_t[:, 0]))], dim=-1))
        torch.testing.assert_close(enc([x_t, x_i]), want)
        rec = Recommender(ModelConfig(method=method), [d, d], [1, 1])
        groups = {g["name"]: g["params"] for g in rec.param_groups(TrainConfig())}
        assert set(groups) == {"main"} and sum(p.numel() for p in groups["main"]) == sum(p.numel() for p in rec.parameters())


def test_output_state_is_the_backbones_output_for_every_family():
    """`output_layer` and `backbone_states` say where the output state (`last_hidden_state`) is:
    h[L] where transformers lists it last (BERT; decoder LLMs list their last state after the
    final norm), and an extra state L+1 for ViT, whose final LayerNorm follows h[L]."""
    from transformers import (
        BertConfig,
        BertModel,
        GemmaConfig,
        GemmaModel,
        LlamaConfig,
        LlamaModel,
        MistralConfig,
        MistralModel,
        MixtralConfig,
        MixtralModel,
        MPNetConfig,
        MPNetModel,
        ViTConfig,
        ViTModel,
    )

    from iisan.encoders.backbones import FAMILIES, BackboneSpec, output_layer
    from iisan.encoders.item_inputs import backbone_states

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    dec = dict(small, num_key_value_heads=2, vocab_size=100, head_dim=16)
    text = torch.tensor([[1, 2, 3, 4]])
    models = {
        "bert": (BertModel(BertConfig(**small, vocab_size=100), add_pooling_layer=False), dict(input_ids=text)),
        "mpnet": (MPNetModel(MPNetConfig(**small, vocab_size=100), add_pooling_layer=False), dict(input_ids=text)),
        "vit": (ViTModel(ViTConfig(**small, image_size=16, patch_size=8), add_pooling_layer=False),
                dict(pixel_values=torch.randn(1, 3, 16, 16))),
        "llama": (LlamaModel(LlamaConfig(**dec)), dict(input_ids=text)),
        "mistral": (MistralModel(MistralConfig(**dec)), dict(input_ids=text)),
        "gemma": (GemmaModel(GemmaConfig(**dec)), dict(input_ids=text)),
        "mixtral": (MixtralModel(MixtralConfig(**dec, num_local_experts=2)), dict(input_ids=text)),
    }
    assert set(models) == set(FAMILIES)
    for family, (model, inputs) in models.items():
        out = model.eval()(**inputs, output_hidden_states=True)
        spec = BackboneSpec.from_config("b", {"source": "demo", "family": family, "modality": FAMILIES[family],
                                              "layers": 2, "hidden": 32})
        states = backbone_states(spec, out)
        assert len(states) == output_layer(family, 2) + 1 == spec.output_layer + 1
        assert torch.equal(states[spec.output_layer], out.last_hidden_state), family
        assert torch.equal(states[2], out.hidden_states[2])
        assert (spec.output_layer == 3) == (not torch.equal(out.hidden_states[-1], out.last_hidden_state)), family


def test_cache_dtype_is_float32_but_float16_for_quantised_backbones():
    """Paper footnote 7 and the authors' code: BERT/ViT and the 7-8B LLM states computed and
    stored in fp32, the 4-bit 70B model's stored in fp16; `cache.dtype` float16 stores every
    backbone in fp16; Fig. 6 computes sizes in the stored dtype, with ViT's output state."""
    from iisan.encoders.backbones import BackboneSpec
    from iisan.tables.figures import cache_sizes

    for cfg in (workflow_config(), workflow_config(ROOT, "config/paper.yaml")):
        assert cfg["cache"]["dtype"] == "auto"
        for name, entry in cfg["backbones"].items():
            spec = BackboneSpec.from_config(name, {k: v for k, v in entry.items() if k not in ("group", "params_b")})
            assert spec.cache_dtype("auto") == ("float16" if spec.quantization else "float32"), name
            assert spec.cache_dtype("float16") == "float16"
    paper = workflow_config(ROOT, "config/paper.yaml")
    b = paper["backbones"]
    assert {b[n]["dtype"] for n in ("bert-base", "bert-large", "vit-base", "vit-large", "vit-huge", "gemma-7b", "mistral-7b",
                                    "llama2-7b", "llama3-8b")} == {"float32"}
    assert b["llama3-70b-gptq"]["dtype"] == "float16" and b["llama3-70b-gptq"]["quantization"] == "gptq"
    sizes = {r["backbone"]: r for r in cache_sizes(b, [], 20825).to_dicts()}
    assert sizes["bert-base"]["computed_full_bytes"] == 20826 * 13 * 768 * 4
    assert sizes["vit-base"]["computed_full_bytes"] == 20826 * 14 * 768 * 4
    assert sizes["llama3-70b-gptq"]["computed_full_bytes"] == 20826 * 81 * 8192 * 2
    assert sizes["llama3-70b-gptq"]["computed_dropped_bytes"] == 20826 * 7 * 8192 * 2
    fp16 = {r["backbone"]: r for r in cache_sizes(b, [], 20825, "float16").to_dicts()}
    assert fp16["bert-base"]["computed_full_bytes"] * 2 == sizes["bert-base"]["computed_full_bytes"]


def test_table4_has_the_papers_17_rows():
    """Table IV: 13 text encoders with ViT-base in Fig. 4's groups, then BERT-base and
    Llama-3-70B-GPTQ with ViT-large and ViT-huge; real Hugging Face ids in config/paper.yaml and
    same-shape stand-ins (their own seeds: their own names) on the demo."""
    paper = workflow_config(ROOT, "config/paper.yaml")
    rows = table_plan("table4", paper)
    text = ["bert-base", "bert-large", "gemma-7b-it", "gemma-7b", "mistral-7b", "llama2-7b", "llama2-7b-chat", "llama3-8b",
            "llama3-8b-it", "mixtral-8x7b-it", "mixtral-8x7b", "llama3-70b-gptq-it", "llama3-70b-gptq"]  # the paper's order
    pairs = [(t, "vit-base") for t in text] + [("bert-base", "vit-large"), ("bert-base", "vit-huge"),
                                               ("llama3-70b-gptq", "vit-large"), ("llama3-70b-gptq", "vit-huge")]
    assert [(r["towers"][0]["backbone"], r["towers"][1]["backbone"]) for r in rows] == pairs
    assert [r["group"] for r in rows] == ["PLM"] * 2 + ["base LLM"] * 7 + ["MoE LLM"] * 2 + ["70B"] * 2 + ["image scaling"] * 4
    b = paper["backbones"]
    assert b["llama3-70b-gptq"]["source"] == "TechxGenus/Meta-Llama-3-70B-GPTQ"
    assert b["llama3-70b-gptq-it"]["source"] == "TechxGenus/Meta-Llama-3-70B-Instruct-GPTQ"
    assert {b[n]["source"] for n in ("gemma-7b-it", "llama2-7b-chat", "llama3-8b-it", "mixtral-8x7b-it")} == {
        "google/gemma-7b-it", "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Meta-Llama-3-8B-Instruct",
        "mistralai/Mixtral-8x7B-Instruct-v0.1"}
    for r in rows:  # every row keeps six blocks per tower
        for t, s in zip(r["towers"], r["scheme"].split("+") * (2 if "+" not in r["scheme"] else 1)):
            assert len(scheme_layers(s, b[t["backbone"]]["layers"], include_h0=False)) == 6, r
    demo = workflow_config()
    demo_rows = table_plan("table4", demo)
    assert len(demo_rows) == 17 and [r["group"] for r in demo_rows] == [r["group"] for r in rows]
    db = demo["backbones"]
    for base, variant in (("gemma-7b-demo", "gemma-7b-it-demo"), ("llama2-7b-demo", "llama2-7b-chat-demo"),
                          ("llama3-8b-demo", "llama3-8b-it-demo"), ("mixtral-8x7b-demo", "mixtral-8x7b-it-demo"),
                          ("llama3-70b-demo", "llama3-70b-it-demo")):
        assert db[base] == db[variant]
