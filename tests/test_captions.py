"""LLaVA-NeXT captioning (iisan.captions) on a tiny random-weight stand-in: offline build and
reload, the real `generate` path, batch invariance, resume, reuse by image content, shard jobs
and their merge (iisan.captions.shards), stale-settings refusal, video frames as three image slots of one
prompt."""

import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from iisan import captions
from iisan.captions import llava, shards

TITLES = ["The Cat Who Came for Christmas", "A Brief History of Time", "Blue Planet: Oceans",
          "Cooking with Herbs", "Mountain Trails of the Alps", "Street Food Stories"]
MAX_NEW = 8


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
                                  batch_size=batch_size, max_new_tokens=MAX_NEW, device="cpu", settings=SETTINGS,
                                  **{"workers": 0, **kw})


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
    # the memo keeps exactly this caption set's records, keyed by the items' images
    (memo,) = captions.memo_dir(out).glob("*/*.jsonl")
    records = {r["item_id"]: r for r in map(json.loads, memo.read_text().splitlines())}
    assert {i: r["caption"] for i, r in records.items()} == dict(frame.iter_rows())
    assert {i: r["images"] for i, r in records.items()} == {i: captions.pixels_sha256(COVERS[i]) for i in COVERS}


def test_images_steer_the_captions(reference):
    """Random weights carry no meaning, but the image reaches the model: captions differ."""
    assert pl.read_parquet(reference[0])["caption"].n_unique() == len(COVERS)


def test_static_kv_cache_gives_the_same_captions_under_its_own_key(reference, standins, prompts, tmp_path, monkeypatch):
    """captions.kv_cache = static: one cache length for the job (its longest prompt + max_new_tokens
    rounded up to STATIC_BUCKET), prompts padded only to their batch's longest, the short last
    batch filled with its last item (4 covers, batch 3: batches of 3 and 1 + 2 fillers);
    greedy captions equal the dynamic cache's, the settings key names the cache (the dynamic
    default stays out of it, so older caption sets keep theirs), and an unknown cache is refused."""
    seen = []
    real = llava._caption_batch

    def spy(model, processor, texts, images, generation_config, **kwargs):
        mask = llava._encode(processor, texts, images, torch.float32)["attention_mask"]
        assert mask.all(dim=1).any()  # padded to the batch's longest prompt, no further
        seen.append((len(texts), mask.shape[1], generation_config.max_cache_len, generation_config.cache_implementation))
        return real(model, processor, texts, images, generation_config, **kwargs)

    monkeypatch.setattr(llava, "_caption_batch", spy)
    out = tmp_path / "static.parquet"
    manifest = _run(standins, prompts, out, kv_cache="static")
    cache = captions.static_cache_length(max(n for _, n, _, _ in seen), MAX_NEW)
    assert cache % captions.STATIC_BUCKET == 0 and cache - MAX_NEW - captions.STATIC_BUCKET < seen[0][1]
    assert [(b, c, kind) for b, _, c, kind in seen] == [(3, cache, "static")] * 2
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
    real = llava._caption_batch
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed after the first batch")
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(llava, "_caption_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(standins, prompts, out, batch_size=2)
    (memo,) = captions.memo_dir(out).glob("*/*.jsonl")
    assert len(memo.read_text().splitlines()) == 2 and not out.exists()

    resumed = []
    monkeypatch.setattr(llava, "_caption_batch", lambda *a, **k: resumed.append(len(a[2])) or real(*a, **k))
    with caplog.at_level(logging.INFO, logger="iisan.captions"):
        _run(standins, prompts, out, batch_size=2)
    assert resumed == [2], "only the two unfinished items are captioned again"
    assert "2 of 4 items captioned already" in caplog.text
    assert pl.read_parquet(out).equals(pl.read_parquet(reference[0]))


def test_partial_work_under_other_settings_is_discarded(standins, prompts, tmp_path, monkeypatch, caplog):
    out = tmp_path / "covers.parquet"
    real = llava._caption_batch

    def once(*args, **kwargs):
        monkeypatch.setattr(llava, "_caption_batch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        return real(*args, **kwargs)

    monkeypatch.setattr(llava, "_caption_batch", once)
    with pytest.raises(KeyboardInterrupt):
        _run(standins, prompts, out, batch_size=2)
    monkeypatch.setattr(llava, "_caption_batch", real)
    with caplog.at_level(logging.WARNING, logger="iisan.captions"):
        _run(standins, prompts, out, batch_size=2, prompt=prompts["cover"]["text"] + " Be brief.")
    assert "not reusing the captions in" in caplog.text and "prompt_sha256" in caplog.text
    assert len(list(captions.memo_dir(out).iterdir())) == 1, "the memo keeps the current settings only"


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


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


def test_a_caption_set_short_of_its_manifest_is_moved_aside_and_made_again_from_its_memo(reference, standins, prompts, tmp_path,
                                                                                        monkeypatch):
    """A valid Parquet with fewer rows than its manifest's items (the item fields used to fail on
    it with a KeyError at every rerun): the reader names it and moves it aside with its manifest;
    the next caption job writes it again from the memo, captioning nothing."""
    from iisan.data import caption_file, item_texts
    from iisan.io import DamagedFileError

    items = tmp_path / "ds" / "items.parquet"
    items.parent.mkdir()
    pl.DataFrame({"item_id": list(COVERS), "title": ["t"] * len(COVERS)}).write_parquet(items)
    out = caption_file(items, "cover_caption")
    _run(standins, prompts, out)
    whole = item_texts(items, "cover_caption")
    assert whole == pl.read_parquet(reference[0])["caption"].to_list()
    manifest = captions.manifest_path(out)
    pl.read_parquet(out).head(3).write_parquet(out)  # valid, one row short; the manifest says 4 items
    with pytest.raises(captions.DamagedCaptions) as err:
        item_texts(items, "cover_caption")
    assert isinstance(err.value, DamagedFileError)
    assert str(err.value).startswith(f"{out}: columns ['item_id', 'caption'] and 3 rows, but its manifest {manifest.name} "
                                     "says ['item_id', 'caption'] and 4 items; moved aside to ")
    assert "the next run of the workflow captions the items again" in str(err.value)
    assert not out.exists() and not manifest.exists() and len(_aside(out)) == len(_aside(manifest)) == 1

    seen = _count_batches(monkeypatch)
    _run(standins, prompts, out)  # what the workflow's next run does
    assert seen == [] and item_texts(items, "cover_caption") == whole


def test_a_caption_set_without_every_item_is_moved_aside(standins, prompts, tmp_path):
    from iisan.data import caption_file, item_texts

    items = tmp_path / "ds" / "items.parquet"
    items.parent.mkdir()
    pl.DataFrame({"item_id": list(COVERS), "title": ["t"] * len(COVERS)}).write_parquet(items)
    out = caption_file(items, "cover_caption")
    _run(standins, prompts, out, items={i: COVERS[i] for i in (101, 102, 104)})  # sound, but made for other items
    with pytest.raises(captions.DamagedCaptions, match=rf"{out}: no caption for 1 of the 4 items of {items} \(first: 103; it "
                                                       r"holds 3 rows\); moved aside to .*; the next run of the workflow"):
        item_texts(items, "cover_caption")
    assert not out.exists() and len(_aside(out)) == 1


def test_a_caption_shard_without_its_manifest_is_moved_aside(reference, tmp_path):
    copy = tmp_path / "1-of-2.parquet"
    copy.write_bytes(reference[0].read_bytes())
    with pytest.raises(captions.DamagedCaptions, match=rf"{copy}: no manifest 1-of-2.manifest.json beside it"):
        captions.load_captions(copy, {})
    assert not copy.exists() and len(_aside(copy)) == 1


def test_an_undecodable_cover_stops_its_caption_job_naming_the_item(tmp_path):
    """The caption job reads covers as the caches do (`iisan.data.images.open_image`)."""
    from iisan.data.images import UndecodableImage

    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("covers/I1.jpg", b"")
    assert captions.dataset._zip_images(archive, [None])[0].size == (32, 32)
    with pytest.raises(UndecodableImage, match=re.escape(f"{archive}: the image of item 'I1' (member 'covers/I1.jpg') cannot be "
                                                         "decoded (it is empty (0 bytes)); replace it in the archive, or set "
                                                         "dataset_sources.Office.missing_images: blank in the config")):
        captions.dataset._zip_images(archive, ["covers/I1.jpg"], item="I1", dataset="Office")


def test_video_frames_fill_three_image_slots_of_one_prompt(standins, prompts, tmp_path, monkeypatch):
    seen = []
    real = llava._caption_batch

    def spy(model, processor, texts, images, config, **kwargs):
        seen.append((len(texts), len(images), [t.count("<image>") for t in texts]))
        return real(model, processor, texts, images, config, **kwargs)

    monkeypatch.setattr(llava, "_caption_batch", spy)
    out = tmp_path / "videos.parquet"
    captions.caption_items(standins["video"], list(VIDEOS), VIDEOS.__getitem__, prompts["video"]["text"], out, batch_size=2,
                           max_new_tokens=MAX_NEW, device="cpu", settings={"frames": [0.1, 0.5, 0.9]}, workers=0)
    assert seen == [(2, 6, [3, 3])]
    frame = pl.read_parquet(out)
    assert frame["item_id"].to_list() == ["v1", "v2"] and all(frame["caption"])
    # the frames' order is part of the input: reversed frames give another caption
    rev = tmp_path / "reversed.parquet"
    captions.caption_items(standins["video"], ["v1"], lambda i: VIDEOS[i][::-1], prompts["video"]["text"], rev, batch_size=1,
                           max_new_tokens=MAX_NEW, device="cpu", settings={"frames": "reversed"}, workers=0)
    assert pl.read_parquet(rev)["caption"][0] != frame["caption"][0]


# ---------------------------------------------------------------------------------------------
# reuse by image content, shard jobs and their merge


def _count_batches(monkeypatch) -> list[int]:
    """Patch the captioner's batch call to record how many items each batch captions."""
    seen = []
    real = llava._caption_batch

    def spy(model, processor, texts, images, generation_config, **kwargs):
        seen.append(len(texts))
        return real(model, processor, texts, images, generation_config, **kwargs)

    monkeypatch.setattr(llava, "_caption_batch", spy)
    return seen


def test_captions_are_reused_by_image_content(reference, standins, prompts, tmp_path, monkeypatch):
    """A changed, added or removed item's images recaption that item alone; every other caption
    comes from the memo (the captioner never sees it again)."""
    out = tmp_path / "covers.parquet"
    _run(standins, prompts, out)
    first = dict(pl.read_parquet(out).iter_rows())
    assert first == dict(pl.read_parquet(reference[0]).iter_rows())
    seen = _count_batches(monkeypatch)

    changed = {**COVERS, 102: [_image(99, 48, 32)]}
    _run(standins, prompts, out, items=changed)
    got = dict(pl.read_parquet(out).iter_rows())
    assert sum(seen) == 1 and got[102] != first[102] and {i: got[i] for i in (101, 103, 104)} == {i: first[i] for i in (101, 103, 104)}

    seen.clear()
    added = {**changed, 105: [_image(5, 40, 40)]}
    _run(standins, prompts, out, items=added)
    assert sum(seen) == 1 and pl.read_parquet(out)["item_id"].to_list() == [101, 102, 103, 104, 105]

    seen.clear()
    removed = {i: v for i, v in added.items() if i != 101}
    manifest = _run(standins, prompts, out, items=removed)
    assert seen == [] and pl.read_parquet(out)["item_id"].to_list() == [102, 103, 104, 105] and manifest["items"] == 4
    # the memo is pruned to the caption set's items
    (memo,) = captions.memo_dir(out).glob("*/*.jsonl")
    assert sorted(json.loads(line)["item_id"] for line in memo.read_text().splitlines()) == [102, 103, 104, 105]


def test_shard_items_are_contiguous_ranges_of_the_sorted_ids():
    ids = [7, 3, 9, 1, 5, 2, 8]
    parts = [shards.shard_items(ids, k, 3) for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(ids) and [len(p) for p in parts] == [2, 2, 3]
    assert parts == [[1, 2], [3, 5], [7, 9, 8]]  # each in the order of `ids`
    assert [shards.shard_items(list(reversed(ids)), k, 3) for k in (1, 2, 3)] == [p[::-1] for p in parts]
    assert shards.shard_items(ids, 1, 1) == ids
    with pytest.raises(ValueError, match="shard 4 of 3"):
        shards.shard_items(ids, 4, 3)
    with pytest.raises(ValueError, match="captions.shards: 0"):
        shards.caption_shards({"captions": {"shards": 0}})


def _shard_run(standins, prompts, final, k, n, items=COVERS, **kw):
    path = Path(shards.shard_path("ds", "cover", k, n).replace("resources/ds/captions", str(final.parent)))
    mine = shards.shard_items(list(items), k, n)
    _run(standins, prompts, path, items={i: items[i] for i in mine}, memo=captions.memo_dir(final), **kw)
    return path


def test_three_shards_merge_to_the_captions_of_one_job(reference, standins, prompts, tmp_path):
    final = tmp_path / "covers.parquet"
    parts = [_shard_run(standins, prompts, final, k, 3) for k in (1, 2, 3)]
    manifest = captions.merge_captions(list(COVERS), parts, final)
    assert pl.read_parquet(final).equals(pl.read_parquet(reference[0]))
    one = reference[1]
    assert manifest["shards"] == 3 and {k: v for k, v in manifest.items() if k not in ("shards", "batch_size")} == \
        {k: v for k, v in one.items() if k != "batch_size"}
    assert captions.load_captions(final, one["settings"]).equals(pl.read_parquet(reference[0]))
    assert sorted(p.name for p in captions.memo_dir(final).glob("*/*.jsonl")) == ["1-of-3.jsonl", "2-of-3.jsonl", "3-of-3.jsonl"]
    # a shard that does not hold its items is refused
    with pytest.raises(captions.CaptionError, match="does not hold its items"):
        captions.merge_captions(list(COVERS), [parts[1], parts[0], parts[2]], tmp_path / "wrong.parquet")


def test_a_failed_shard_loses_no_other_shards_captions(reference, standins, prompts, tmp_path, monkeypatch):
    """Shard 3 of 3 dies after its first batch: shards 1 and 2 stay; the merge refuses the set
    until shard 3 reruns, which captions only its unfinished item; the merge then equals one job."""
    final = tmp_path / "covers.parquet"
    parts = [_shard_run(standins, prompts, final, k, 3, batch_size=1) for k in (1, 2)]
    stamps = [p.stat().st_mtime_ns for p in parts]
    real = llava._caption_batch
    calls = []

    def dies(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed after the first batch")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llava, "_caption_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        _shard_run(standins, prompts, final, 3, 3, batch_size=1)
    third = Path(str(parts[0]).replace("1-of-3", "3-of-3"))
    with pytest.raises(captions.CaptionError, match="3-of-3"):
        captions.merge_captions(list(COVERS), [*parts, third], final)
    monkeypatch.setattr(llava, "_caption_batch", real)
    seen = _count_batches(monkeypatch)
    assert _shard_run(standins, prompts, final, 3, 3, batch_size=1) == third
    assert seen == [1], "only the item shard 3 had not finished"
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    captions.merge_captions(list(COVERS), [*parts, third], final)
    assert pl.read_parquet(final).equals(pl.read_parquet(reference[0]))


def test_resharding_reuses_the_captions_of_other_shards(reference, standins, prompts, tmp_path, monkeypatch):
    final = tmp_path / "covers.parquet"
    two = [_shard_run(standins, prompts, final, k, 2) for k in (1, 2)]
    captions.merge_captions(list(COVERS), two, final)
    seen = _count_batches(monkeypatch)
    three = [_shard_run(standins, prompts, final, k, 3) for k in (1, 2, 3)]
    captions.merge_captions(list(COVERS), three, final)
    assert seen == [] and pl.read_parquet(final).equals(pl.read_parquet(reference[0]))


def test_caption_dataset_recaptions_only_items_whose_frames_changed(standins, prompts, tmp_path, monkeypatch):
    """Video captions of a frames archive: keys are the members' bytes; an item whose frames
    were black (skipped video) and are now real is the only one captioned again."""
    import io

    def frames_zip(path, videos):
        with zipfile.ZipFile(path, "w") as zf:
            for item, frames in videos.items():
                for k, im in enumerate(frames):
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    zf.writestr(f"{item}_{k}.jpg", buf.getvalue())

    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": ["v1", "v2", "v3"]}).write_parquet(items)
    prompts_file = tmp_path / "prompts.yaml"
    import yaml

    prompts_file.write_text(yaml.safe_dump(prompts))
    archive, out = tmp_path / "frames.zip", tmp_path / "captions" / "video.parquet"
    v3 = [_image(30 + k, 36, 36) for k in range(3)]
    frames_zip(archive, VIDEOS)  # v3's video was skipped: black frames

    def caption():
        job = captions.CaptionJob("video", str(standins["video"]), str(out),
                                  captions.CaptionSettings(batch_size=2, max_new_tokens=MAX_NEW, workers=0))
        return captions.caption_dataset(job, items, archive, prompts_file, out, device="cpu")

    caption()
    first = dict(pl.read_parquet(out).iter_rows())
    seen = _count_batches(monkeypatch)
    frames_zip(archive, {**VIDEOS, "v3": v3})
    caption()
    got = dict(pl.read_parquet(out).iter_rows())
    assert seen == [1] and got["v3"] != first["v3"] and (got["v1"], got["v2"]) == (first["v1"], first["v2"])
    # the same archive again: nothing to caption
    seen.clear()
    caption()
    assert seen == [] and dict(pl.read_parquet(out).iter_rows()) == got
