"""Caption speed: the hardware bound and memory plan of LLaVA-NeXT (iisan.captions.caption_bound) on the
real checkpoints' shapes, and the fast paths of iisan.captions (attention on the K/V heads,
FlexAttention, images prepared in worker processes, batch size from the memory plan), which
give the default path's captions on the CPU stand-in."""

import os

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from iisan import captions
from iisan.captions import caption_bound as cb
from iisan.captions import llava

# ---------------------------------------------------------------------------------------------
# the bound and the memory plan

# config.json of llava-hf/llava-v1.6-mistral-7b-hf and llava-hf/llava-v1.6-34b-hf (text model;
# both have CLIP ViT-L/14 at 336 px), and what the processor makes of a 1280x720 cover and of
# three 1280x720 frames (tokens of the whole prompt, tiles of the any-resolution grid)
SHAPES = {
    "7b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32064, family="mistral", params=7_566_747_648),
    "34b": dict(hidden=7168, layers=60, heads=56, kv_heads=8, intermediate=20480, vocab=64064, family="llama", params=34_752_083_968),
}
VISION = dict(hidden=1024, intermediate=4096, layers=24, heads=16, tile=336, patch=14)
PROMPTS = {"cover": dict(tokens=1968, tiles=5), "video": dict(tokens=5867, tiles=15)}
# peak GPU memory (GiB) of the 7B model, 300 new tokens, dynamic cache (H200, docs/benchmarks-history.md)
MEASURED_PEAK_GIB = {("cover", 8): 17.9, ("cover", 32): 29.4, ("video", 8): 25.5, ("video", 16): 36.9}


def _config(name):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    s = SHAPES[name]
    text = (MistralConfig if s["family"] == "mistral" else LlamaConfig)(
        hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"])
    vision = CLIPVisionConfig(hidden_size=VISION["hidden"], intermediate_size=VISION["intermediate"], num_hidden_layers=VISION["layers"],
                              num_attention_heads=VISION["heads"], image_size=VISION["tile"], patch_size=VISION["patch"])
    return LlavaNextConfig(vision_config=vision, text_config=text)


@pytest.mark.parametrize("name, shapes", [("7b", cb.LLAVA_NEXT_MISTRAL_7B), ("34b", cb.LLAVA_NEXT_34B)])
def test_shapes_count_the_parameters_of_the_real_architecture(name, shapes):
    """The shapes as data give exactly the parameters of transformers' LLaVA-NeXT built on them
    (on the meta device: no memory)."""
    from transformers import LlavaNextForConditionalGeneration

    config = _config(name)
    assert cb.shapes_from_config(config) == shapes
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == shapes.params == SHAPES[name]["params"]
    lm = model.model.language_model
    assert shapes.decode_params == sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()


def test_kv_cache_bytes_per_token():
    assert cb.LLAVA_NEXT_MISTRAL_7B.kv_bytes_per_token() == 32 * 2 * 8 * 128 * 2 == 131_072
    assert cb.LLAVA_NEXT_34B.kv_bytes_per_token() == 60 * 2 * 8 * 128 * 2 == 245_760


def test_decode_bound_is_weights_plus_live_cache_per_step():
    """Video prompts, batch 8, 100 new tokens, 4,280 GB/s: a step reads 14.2 GB of weights and
    8 x (5,867 + 50.5) tokens x 131 kB of cache: 4.77 ms, so 25.4 ms per step is 18.8 % of the
    bound; prefill at 780 TFLOP/s."""
    s = cb.LLAVA_NEXT_MISTRAL_7B
    b = cb.caption_bound(s, prompt_tokens=5867, tiles=15, new_tokens=100, batch=8, tflops=780, bandwidth_gbs=4280)
    weights = 2 * s.decode_params
    kv = 131_072 * 8 * (5867 + 50.5)
    assert b.step_s == pytest.approx((weights + kv) / 4280e9)
    assert b.step_s == pytest.approx(4.77e-3, rel=0.01)
    assert b.decode_s == pytest.approx(b.step_s * 100 / 8)
    assert 0.18 < b.step_s / 25.4e-3 < 0.19
    lm_flops = 2 * 32 * s.layer_params * 5867 + 2 * 32 * 5867**2 * 4096
    assert lm_flops < s.prefill_flops(5867, 15) < 1.1 * lm_flops  # the vision tower and projector add a few %
    assert b.prefill_s == pytest.approx(s.prefill_flops(5867, 15) / 780e12)
    assert b.item_s == b.prefill_s + b.decode_s and b.items_per_s == pytest.approx(1 / b.item_s)
    # larger batches share the weights: the decode time per item falls, the step time rises
    b32 = cb.caption_bound(s, prompt_tokens=5867, tiles=15, new_tokens=100, batch=32, tflops=780, bandwidth_gbs=4280)
    assert b32.decode_s < b.decode_s and b32.step_s > b.step_s and b32.prefill_s == b.prefill_s
    with pytest.raises(ValueError, match="at least 1"):
        cb.caption_bound(s, prompt_tokens=10, tiles=1, new_tokens=10, batch=0, tflops=1, bandwidth_gbs=1)


@pytest.mark.parametrize("kind, batch", sorted(MEASURED_PEAK_GIB))
def test_memory_plan_matches_measured_peaks(kind, batch):
    peak = cb.memory_bytes(cb.LLAVA_NEXT_MISTRAL_7B, batch=batch, prompt_tokens=PROMPTS[kind]["tokens"], new_tokens=300)
    assert peak / 2**30 == pytest.approx(MEASURED_PEAK_GIB[kind, batch], rel=0.05)


def test_largest_batch_fits_the_card_and_the_next_does_not():
    s, card = cb.LLAVA_NEXT_MISTRAL_7B, 79.1 * 2**30  # an H100 80GB as torch reports it
    for p in PROMPTS.values():
        b = cb.largest_batch(s, prompt_tokens=p["tokens"], new_tokens=300, memory=card)
        assert cb.memory_bytes(s, batch=b, prompt_tokens=p["tokens"], new_tokens=300) <= card - cb.reserve_bytes(card)
        assert cb.memory_bytes(s, batch=b + 1, prompt_tokens=p["tokens"], new_tokens=300) > card - cb.reserve_bytes(card)
    assert cb.largest_batch(s, prompt_tokens=5867, new_tokens=300, memory=card) == 37
    assert cb.largest_batch(s, prompt_tokens=1968, new_tokens=300, memory=card) == 107
    assert cb.largest_batch(s, prompt_tokens=1968, new_tokens=300, memory=card, cap=64) == 64
    # free memory after loading: the weights are not counted again
    free = card - s.params * 2
    assert cb.largest_batch(s, prompt_tokens=5867, new_tokens=300, memory=free, weights=False) == 38
    # the 34B model on one card leaves room for one video prompt, on two for many more
    assert cb.largest_batch(cb.LLAVA_NEXT_34B, prompt_tokens=5867, new_tokens=300, memory=card) == 1
    assert cb.largest_batch(cb.LLAVA_NEXT_34B, prompt_tokens=5867, new_tokens=300, memory=2 * card) == 31
    with pytest.raises(ValueError, match="one item of 5867 prompt"):
        cb.largest_batch(cb.LLAVA_NEXT_34B, prompt_tokens=5867, new_tokens=300, memory=66 * 2**30)


# ---------------------------------------------------------------------------------------------
# the fast paths give the default path's captions (CPU stand-in, fp32)

MAX_NEW = 8
SETTINGS = {"images": "test covers"}


def _image(seed, height, width):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


COVERS = {101: [_image(1, 32, 32)], 102: [_image(2, 48, 32)], 103: [_image(3, 32, 80)], 104: [_image(4, 64, 64)],
          105: [_image(5, 40, 72)]}
VIDEOS = {"v1": [_image(10 + k, 36, 64) for k in range(3)], "v2": [_image(20 + k, 40, 40) for k in range(3)],
          "v3": [_image(30 + k, 64, 32) for k in range(3)]}


@pytest.fixture(scope="module")
def standins(tmp_path_factory, prompts):
    """Mistral-style (covers) and Llama/ChatML-style (videos) stand-ins, both grouped-query (4 heads, 2 K/V heads)."""
    base = tmp_path_factory.mktemp("captioners")
    texts = ["Blue Planet: Oceans", "Cooking with Herbs", "Street Food Stories"] + [p["text"] for p in prompts.values()]
    captions.build_captioner_standin(base / "cover", texts, seed=1)
    captions.build_captioner_standin(base / "video", texts, seed=2, text_family="llama")
    return {"cover": base / "cover", "video": base / "video"}


def _run(standins, prompts, out, kind="cover", batch_size=2, **kw):
    items = COVERS if kind == "cover" else VIDEOS
    return captions.caption_items(standins[kind], list(items), items.__getitem__, prompts[kind]["text"], out,
                                  batch_size=batch_size, max_new_tokens=MAX_NEW, device="cpu", settings=SETTINGS,
                                  **{"workers": 0, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, standins, prompts):
    """Captions of the default path: dynamic cache, transformers' SDPA, images read in series."""
    base = tmp_path_factory.mktemp("reference")
    return {kind: (_run(standins, prompts, base / f"{kind}.parquet", kind), pl.read_parquet(base / f"{kind}.parquet"))
            for kind in ("cover", "video")}


def test_standin_shapes_give_its_parameters(standins):
    from transformers import LlavaNextForConditionalGeneration

    for path in standins.values():
        model = LlavaNextForConditionalGeneration.from_pretrained(path)
        assert cb.shapes_from_config(model.config).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("q_len", [1, 3])
def test_sdpa_gqa_attention_equals_transformers_sdpa(q_len):
    """One query token against a padded cache: attention on the K/V heads as stored equals SDPA
    over K/V expanded to the query heads; longer queries go to transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    b, heads, kv_heads, length, d = 3, 8, 2, 37, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    q = torch.randn(b, heads, q_len, d)
    k, v = torch.randn(b, kv_heads, length, d), torch.randn(b, kv_heads, length, d)
    mask = torch.ones(b, 1, q_len, length, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding
    mask[2, ..., 30:] = False  # the static cache's unwritten tail
    out, weights = llava._sdpa_gqa_attention(module, q, k, v, mask, scaling=0.25, dropout=0.0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=0.25)
    assert weights is None and out.shape == (b, q_len, heads, d)
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("attention", ["sdpa_gqa", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_attention_options_give_the_same_captions_under_their_own_key(reference, standins, prompts, tmp_path, monkeypatch,
                                                                      kv_cache, attention):
    """Same greedy captions (fp32) as transformers' SDPA for covers and videos, dynamic and static
    caches; the attention joins the settings key; an unknown one is refused. (FlexAttention and
    its block masks run uncompiled here: inductor's CPU code for them takes minutes, and fails to
    build with torch 2.13.)"""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import masking_utils
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    block_mask = masking_utils.create_block_mask
    monkeypatch.setattr(masking_utils, "create_block_mask", lambda *a, **k: block_mask(*a, **{**k, "_compile": False}))
    seen = []
    real = llava._sdpa_gqa_attention
    monkeypatch.setattr(llava, "_sdpa_gqa_attention", lambda *a, **k: seen.append(a[1].shape[2]) or real(*a, **k))
    for kind in ("cover", "video"):
        out = tmp_path / f"{kind}.parquet"
        manifest = _run(standins, prompts, out, kind, kv_cache=kv_cache, attention=attention)
        assert pl.read_parquet(out).equals(reference[kind][1]), (kind, kv_cache, attention)
        assert manifest["settings"]["decoding"]["attention"] == attention
        assert "attention" not in reference[kind][0]["settings"]["decoding"]
    if attention == "sdpa_gqa":  # registered once, then looked up by name: every decode step went through it
        assert seen.count(1) > 0 and len(seen) > 0
    with pytest.raises(ValueError, match="captions.attention: 'flash' is not one of sdpa, sdpa_gqa, flex_attention"):
        _run(standins, prompts, tmp_path / "x.parquet", attention="flash")


def test_load_captioner_sets_the_language_models_attention_only(standins):
    model, _ = captions.load_captioner(str(standins["cover"]), "cpu", attention="sdpa_gqa")
    assert model.config.text_config._attn_implementation == "sdpa_gqa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    default, _ = captions.load_captioner(str(standins["cover"]), "cpu")
    assert default.config.text_config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_sdpa_gqa_decode_compiles_without_graph_breaks(reference, standins, prompts, tmp_path, monkeypatch):
    """The static cache's decode step, compiled whole (fullgraph, dynamo with the eager backend
    on the CPU), runs the K/V-head attention and gives the same captions."""
    from transformers import CompileConfig

    real = llava._caption_batch

    def compiled(model, processor, texts, images, generation_config, *args, **kwargs):
        generation_config.compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
        generation_config.compile_config._compile_all_devices = True
        return real(model, processor, texts, images, generation_config, *args, **kwargs)

    monkeypatch.setattr(llava, "_caption_batch", compiled)
    seen = []
    attention = llava._sdpa_gqa_attention
    monkeypatch.setattr(llava, "_sdpa_gqa_attention", lambda *a, **k: seen.append(torch.compiler.is_compiling()) or attention(*a, **k))
    torch._dynamo.reset()
    out = tmp_path / "video.parquet"
    _run(standins, prompts, out, "video", batch_size=3, kv_cache="static", attention="sdpa_gqa")
    assert pl.read_parquet(out).equals(reference["video"][1])
    assert True in seen  # traced into the compiled decode step


def test_workers_prepare_the_images_ahead_with_the_same_captions(reference, standins, prompts, tmp_path, monkeypatch):
    """workers=2: images_for and the processor run in forked worker processes, the batches reach
    `_caption_batch` encoded and in order, and the captions equal those read in series."""
    where = tmp_path / "where"
    where.mkdir()

    def images_for(item_id):
        (where / f"{os.getpid()}-{item_id}").touch()
        return VIDEOS[item_id]

    seen = []
    real = llava._caption_batch

    def spy(model, processor, texts, images, generation_config, **kw):
        seen.append((len(texts), images, sorted(kw)))
        return real(model, processor, texts, images, generation_config, **kw)

    monkeypatch.setattr(llava, "_caption_batch", spy)
    out = tmp_path / "video.parquet"
    # images keyed by id, as caption_dataset keys them by their files' bytes: no pixels hashed here
    manifest = captions.caption_items(standins["video"], list(VIDEOS), images_for, prompts["video"]["text"], out, batch_size=2,
                                      max_new_tokens=MAX_NEW, device="cpu", settings=SETTINGS, workers=2, image_key=str)
    assert pl.read_parquet(out).equals(reference["video"][1])
    assert manifest["settings"] == reference["video"][0]["settings"]
    assert seen == [(2, None, ["encoded"]), (1, None, ["encoded"])]
    pids = {p.name.split("-")[0] for p in where.iterdir()}
    assert str(os.getpid()) not in pids  # every read (sizes, then the batch) in a worker
    assert {p.name.split("-")[1] for p in where.iterdir()} == set(VIDEOS)
    with pytest.raises(ValueError, match="captions.workers is -1"):
        _run(standins, prompts, tmp_path / "x.parquet", workers=-1)


def test_a_worker_error_names_the_item(standins, prompts, tmp_path):
    items = dict(COVERS, bad=[])
    with pytest.raises(ValueError, match="item 'bad': images_for gave no image"):
        captions.caption_items(standins["cover"], list(items), items.__getitem__, prompts["cover"]["text"], tmp_path / "c.parquet",
                               batch_size=2, max_new_tokens=MAX_NEW, device="cpu", settings=SETTINGS, workers=1)


def test_auto_batch_size_on_a_cpu_is_eight_at_most(reference, standins, prompts, tmp_path):
    manifest = _run(standins, prompts, tmp_path / "c.parquet", batch_size="auto")
    assert manifest["batch_size"] == len(COVERS) < captions.AUTO_BATCH_CPU
    assert pl.read_parquet(tmp_path / "c.parquet").equals(reference["cover"][1])
    for bad in (0, "big", 2.5):
        with pytest.raises(ValueError, match="captions.batch_size is"):
            _run(standins, prompts, tmp_path / "x.parquet", batch_size=bad)


def test_auto_batch_size_on_gpus_is_the_memory_plan_of_their_free_memory(monkeypatch):
    """On CUDA: the free memory of every card the model is spread over, the model's shapes."""
    from types import SimpleNamespace

    free = {0: 30 * 2**30, 1: 50 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda k: (free[k], 80 * 2**30))
    model = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, config=_config("7b"),
                            hf_device_map={"model.vision_tower": 0, "model.language_model.layers.20": 1, "lm_head": "cuda:1"})
    expected = cb.largest_batch(cb.LLAVA_NEXT_MISTRAL_7B, prompt_tokens=5888, new_tokens=300, memory=80 * 2**30, weights=False)
    assert captions.auto_batch_size(model, 5888, 300, 1000) == expected == 47
    assert captions.auto_batch_size(model, 5888, 300, 10) == 10
    assert captions.batch_too_large(model, 47, 5888, 300) is None
    assert captions.batch_too_large(model, 64, 5888, 300) == "the memory plan fits 47"
    free.update({0: 2**30, 1: 0})
    assert captions.batch_too_large(model, 8, 5888, 300).startswith("one item of 5888 prompt + 300 new tokens needs")
    free.update({0: 30 * 2**30, 1: 50 * 2**30})
    del model.hf_device_map
    assert captions.auto_batch_size(model, 5888, 300, 1000) == cb.largest_batch(
        cb.LLAVA_NEXT_MISTRAL_7B, prompt_tokens=5888, new_tokens=300, memory=30 * 2**30, weights=False)


@pytest.mark.slow
def test_benchmark_smoke_runs_the_rule_call_for_each_option(root):
    """benchmarks/caption_speed.py --smoke: tiny shapes on the CPU, one markdown row per option
    and prompt, the rule's call captioning as the first option does."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'benchmarks'}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(root / "benchmarks/caption_speed.py"), "--smoke", "--prompts", "video",
                          "--options", "dynamic/sdpa/0,static/sdpa_gqa/2", "--video-batch", "auto"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| video")]
    assert [r.split("|")[3].strip() for r in rows] == ["dynamic/sdpa/0", "static/sdpa_gqa/2"]
    assert all(r.split("|")[2].strip() == str(captions.AUTO_BATCH_CPU) for r in rows)
    assert all(r.rstrip(" |").endswith("100%") for r in rows)
