"""LLaVA-NeXT captioning (iisan.captions) on a tiny random-weight stand-in: offline build and
reload, the real `generate` path, batch invariance, resume, stale-settings refusal, video
frames as three image slots of one prompt."""

import logging

import numpy as np
import polars as pl
import pytest
from PIL import Image

from iisan import captions

TITLES = ["The Cat Who Came for Christmas", "A Brief History of Time", "Blue Planet: Oceans",
          "Cooking with Herbs", "Mountain Trails of the Alps", "Street Food Stories"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def prompts(root):
    return captions.load_prompts(root / "config/prompts/captions.yaml")


@pytest.fixture(scope="module")
def standins(tmp_path_factory, prompts):
    """Mistral-style (covers) and Llama/ChatML-style (video frames) stand-ins."""
    base = tmp_path_factory.mktemp("captioners")
    texts = TITLES + [p["text"] for p in prompts.values()]
    captions.build_captioner_standin(base / "cover", texts, seed=1)
    captions.build_captioner_standin(base / "video", texts, seed=2, text_family="llama")
    return {"cover": base / "cover", "video": base / "video"}


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# four covers of different sizes, hence different token counts and padding in a batch
COVERS = {101: [_image(1, 32, 32)], 102: [_image(2, 48, 32)], 103: [_image(3, 32, 80)], 104: [_image(4, 64, 64)]}
# two videos of three frames each
VIDEOS = {"v1": [_image(10 + k, 36, 64) for k in range(3)], "v2": [_image(20 + k, 40, 40) for k in range(3)]}
SETTINGS = {"images": "test covers"}


def _run(standins, prompts, out, *, batch_size=3, prompt=None, items=COVERS, kind="cover", **kw):
    return captions.caption_items(standins[kind], list(items), items.__getitem__, prompt or prompts[kind]["text"], out,
                                  batch_size=batch_size, max_new_tokens=MAX_NEW, device="cpu", settings=SETTINGS, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, standins, prompts):
    """An uninterrupted run over the covers with batch size 3."""
    out = tmp_path_factory.mktemp("ref") / "covers.parquet"
    manifest = _run(standins, prompts, out)
    return out, manifest


def test_standin_builds_and_reloads_offline(standins, monkeypatch):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for kind, path in standins.items():
        model = LlavaNextForConditionalGeneration.from_pretrained(path, local_files_only=True)
        processor = LlavaNextProcessor.from_pretrained(path, local_files_only=True)
        assert isinstance(processor.image_processor, LlavaNextImageProcessorPil)
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
        assert model.config.text_config.model_type == {"cover": "mistral", "video": "llama"}[kind]
        assert sum(p.numel() for p in model.parameters()) < 1_000_000
        text = processor.apply_chat_template(captions.conversation("Describe this cover", 3), add_generation_prompt=True)
        assert text.count("<image>") == 3
        assert "<unk>" not in processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("Describe this cover")["input_ids"])


def test_prompt_lengths_count_the_image_tokens(standins, prompts):
    """The length used to sort batches is the processor's real token count, image tokens included."""
    model, processor = captions.load_captioner(str(standins["video"]), "cpu")
    items = [COVERS[101], COVERS[103], VIDEOS["v1"], VIDEOS["v2"]]
    rendered = {k: processor.apply_chat_template(captions.conversation(prompts["video"]["text"], k), add_generation_prompt=True)
                for k in (1, 3)}
    sizes = [[(im.height, im.width) for im in imgs] for imgs in items]
    real = [processor(images=imgs, text=[rendered[len(imgs)]], return_tensors="pt")["input_ids"].shape[1] for imgs in items]
    assert captions.prompt_lengths(processor, rendered, sizes) == real
    assert len(set(real)) == len(real)


def test_caption_items_gives_one_caption_per_item(reference, standins, prompts):
    out, manifest = reference
    frame = pl.read_parquet(out)
    assert frame.columns == ["item_id", "caption"]
    assert frame["item_id"].to_list() == list(COVERS)
    assert all(isinstance(c, str) and c for c in frame["caption"])
    # the stand-in never emits a special token: every caption is MAX_NEW words
    assert all(len(c.split()) == MAX_NEW for c in frame["caption"])
    assert manifest["items"] == 4 and manifest["truncated"] == 4 and manifest["empty"] == 0
    expected = captions.caption_settings(standins["cover"], prompts["cover"]["text"], max_new_tokens=MAX_NEW,
                                         device="cpu", settings=SETTINGS)
    assert manifest["settings"] == expected
    assert captions.load_captions(out, expected).equals(frame)
    assert not any(p.exists() for p in captions.partial_paths(out))


def test_images_steer_the_captions(reference):
    """Random weights carry no meaning, but the image reaches the model: captions differ."""
    assert pl.read_parquet(reference[0])["caption"].n_unique() == len(COVERS)


def test_static_kv_cache_gives_the_same_captions_under_its_own_key(reference, standins, prompts, tmp_path, monkeypatch):
    """captions.kv_cache = static: prompts padded to a multiple of STATIC_BUCKET tokens, the short
    last batch filled with its last item (4 covers, batch 3: batches of 3 and 1 + 2 fillers);
    greedy captions equal the dynamic cache's, the settings key names the cache (the dynamic
    default stays out of it, so older caption sets keep theirs), and an unknown cache is refused."""
    seen = []
    real = captions._caption_batch

    def spy(model, processor, texts, images, generation_config, pad_to_multiple_of=None):
        seen.append((len(texts), pad_to_multiple_of, generation_config.cache_implementation))
        return real(model, processor, texts, images, generation_config, pad_to_multiple_of)

    monkeypatch.setattr(captions, "_caption_batch", spy)
    out = tmp_path / "static.parquet"
    manifest = _run(standins, prompts, out, kv_cache="static")
    assert seen == [(3, captions.STATIC_BUCKET, "static")] * 2
    assert pl.read_parquet(out).equals(pl.read_parquet(reference[0]))
    assert manifest["settings"]["decoding"]["kv_cache"] == "static"
    assert "kv_cache" not in reference[1]["settings"]["decoding"]
    assert {k: v for k, v in manifest["settings"].items() if k != "decoding"} == \
        {k: v for k, v in reference[1]["settings"].items() if k != "decoding"}
    with pytest.raises(ValueError, match="captions.kv_cache: 'paged' is not one of dynamic, static"):
        _run(standins, prompts, tmp_path / "x.parquet", kv_cache="paged")


def test_batch_size_does_not_change_captions(reference, standins, prompts, tmp_path):
    one = tmp_path / "one.parquet"
    _run(standins, prompts, one, batch_size=1)
    assert pl.read_parquet(one).equals(pl.read_parquet(reference[0]))


def test_resume_after_interruption_gives_the_same_captions(reference, standins, prompts, tmp_path, monkeypatch, caplog):
    out = tmp_path / "covers.parquet"
    real = captions._caption_batch
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed after the first batch")
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(captions, "_caption_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(standins, prompts, out, batch_size=2)
    partial, key = captions.partial_paths(out)
    assert len(partial.read_text().splitlines()) == 2 and key.exists() and not out.exists()

    resumed = []
    monkeypatch.setattr(captions, "_caption_batch", lambda *a, **k: resumed.append(len(a[2])) or real(*a, **k))
    with caplog.at_level(logging.INFO, logger="iisan.captions"):
        _run(standins, prompts, out, batch_size=2)
    assert resumed == [2], "only the two unfinished items are captioned again"
    assert "2 of 4 items captioned already" in caplog.text
    assert pl.read_parquet(out).equals(pl.read_parquet(reference[0]))


def test_partial_work_under_other_settings_is_discarded(standins, prompts, tmp_path, monkeypatch, caplog):
    out = tmp_path / "covers.parquet"
    real = captions._caption_batch

    def once(*args, **kwargs):
        monkeypatch.setattr(captions, "_caption_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        return real(*args, **kwargs)

    monkeypatch.setattr(captions, "_caption_batch", once)
    with pytest.raises(KeyboardInterrupt):
        _run(standins, prompts, out, batch_size=2)
    monkeypatch.setattr(captions, "_caption_batch", real)
    with caplog.at_level(logging.WARNING, logger="iisan.captions"):
        _run(standins, prompts, out, batch_size=2, prompt=prompts["cover"]["text"] + " Be brief.")
    assert "discarding the partial captions" in caplog.text and "prompt_sha256" in caplog.text


def test_a_changed_prompt_is_refused(reference, standins, prompts):
    out, _ = reference
    other = captions.caption_settings(standins["cover"], prompts["cover"]["text"] + " Be brief.", max_new_tokens=MAX_NEW,
                                      device="cpu", settings=SETTINGS)
    with pytest.raises(captions.CaptionMismatch, match="prompt_sha256 is"):
        captions.load_captions(out, other)
    with pytest.raises(captions.CaptionMismatch, match="images is"):
        captions.load_captions(out, {"images": "other covers"})


def test_a_replaced_parquet_is_refused(reference, tmp_path):
    out, _ = reference
    copy = tmp_path / out.name
    pl.read_parquet(out).with_columns(pl.col("caption") + "!").write_parquet(copy)
    captions.manifest_path(copy).write_text(captions.manifest_path(out).read_text())
    with pytest.raises(captions.CaptionError, match="checksum"):
        captions.load_captions(copy, {})


def test_video_frames_fill_three_image_slots_of_one_prompt(standins, prompts, tmp_path, monkeypatch):
    seen = []
    real = captions._caption_batch

    def spy(model, processor, texts, images, config, pad_to_multiple_of=None):
        seen.append((len(texts), len(images), [t.count("<image>") for t in texts]))
        return real(model, processor, texts, images, config, pad_to_multiple_of)

    monkeypatch.setattr(captions, "_caption_batch", spy)
    out = tmp_path / "videos.parquet"
    captions.caption_items(standins["video"], list(VIDEOS), VIDEOS.__getitem__, prompts["video"]["text"], out, batch_size=2,
                           max_new_tokens=MAX_NEW, device="cpu", settings={"frames": [0.1, 0.5, 0.9]})
    assert seen == [(2, 6, [3, 3])]
    frame = pl.read_parquet(out)
    assert frame["item_id"].to_list() == ["v1", "v2"] and all(frame["caption"])
    # the frames' order is part of the input: reversed frames give another caption
    rev = tmp_path / "reversed.parquet"
    captions.caption_items(standins["video"], ["v1"], lambda i: VIDEOS[i][::-1], prompts["video"]["text"], rev, batch_size=1,
                           max_new_tokens=MAX_NEW, device="cpu", settings={"frames": "reversed"})
    assert pl.read_parquet(rev)["caption"][0] != frame["caption"][0]
