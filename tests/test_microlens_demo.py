"""The MicroLens demo twin: the published file formats, the planted structure, determinism."""

import dataclasses
import re
import zipfile
from pathlib import Path

import polars as pl
import pytest

from iisan.captions import shards
from iisan.data.amazon import read_users
from iisan.data.demo import DemoSpec
from iisan.data.microlens import preprocess, read_titles_csv
from iisan.data.microlens_demo import (
    COVERS_DIR,
    MicroLensDemoSpec,
    VideoSpec,
    frame_group,
    generate,
    hevc_support,
    plan,
)

av = pytest.importorskip("av")

SPEC = MicroLensDemoSpec(n_items=40, n_users=60, video=VideoSpec(min_frames=12, max_frames=20))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("twin"), SPEC)


def test_files_are_exactly_the_published_layout(twin):
    out = twin["pairs"].parent
    assert sorted(p.name for p in out.iterdir()) == [
        "MicroLens-100k_pairs.tsv", "MicroLens-100k_title_en.csv", "MicroLens-100k_videos", "covers.zip",
    ]
    truth = plan(SPEC)
    raw_titles = twin["titles"].read_bytes()
    assert not raw_titles.startswith(b"\xef\xbb\xbf") and b"\r" not in raw_titles and raw_titles.endswith(b"\n")
    lines = raw_titles.decode("utf-8").splitlines()
    assert len(lines) == SPEC.n_items and all(re.fullmatch(r"[1-9]\d*,[^\t]+", line) for line in lines)  # no header
    ids = [line.split(",", 1)[0] for line in lines]
    assert ids == truth.item_ids and len(set(ids)) == len(ids)
    assert ids != sorted(ids) and ids != sorted(ids, key=int)  # MicroLens-like ids, not in sorted order

    pairs = twin["pairs"].read_bytes().decode("utf-8")
    assert "\r" not in pairs and pairs.endswith("\n")
    rows = pairs.splitlines()
    assert len(rows) == SPEC.n_users
    assert all(re.fullmatch(r"[1-9]\d*\t[1-9]\d*( [1-9]\d*)*", row) for row in rows)  # single spaces
    assert [r.split("\t")[0] for r in rows] == [str(u) for u in range(1, SPEC.n_users + 1)]

    with zipfile.ZipFile(twin["covers"]) as zf:
        assert sorted(zf.namelist()) == sorted(f"{COVERS_DIR}/{i}.jpg" for i in ids)
    assert sorted(p.name for p in twin["videos"].iterdir()) == sorted(f"{i}.mp4" for i in ids)


def test_titles_with_commas_survive_the_reader(twin):
    truth = plan(SPEC)
    titles = read_titles_csv(twin["titles"])
    assert list(titles) == truth.item_ids and list(titles.values()) == truth.titles
    with_comma = [t for t in titles.values() if "," in t]
    assert with_comma and any(t.startswith('"') and t.endswith('"') and "," in t for t in titles.values())
    assert all(t == t.strip() and t for t in titles.values())
    users = read_users(twin["pairs"], titles)
    assert [(u, [truth.item_ids.index(i) for i in seq]) for u, seq in users] == truth.users


def test_preprocess_end_to_end_with_covers(twin, tmp_path):
    stats = preprocess(twin["pairs"], twin["titles"], tmp_path, images=twin["covers"])
    truth = plan(SPEC)
    assert (stats["raw_items"], stats["raw_users"]) == (SPEC.n_items, SPEC.n_users)
    assert stats["users"] == sum(len(s) >= 5 for _, s in truth.users) and stats["skipped_lines"] == 0
    assert stats["repaired_lines"] == 0 and stats["blank_images"] == 0
    items = pl.read_parquet(tmp_path / "items.parquet")
    order = items["item_id"].to_list()
    assert order == [i for i in truth.item_ids if i in set(order)]  # titles-file order
    assert items["image"].to_list() == [f"{COVERS_DIR}/{i}.jpg" for i in order]
    titles = dict(zip(truth.item_ids, truth.titles))
    assert items["title"].to_list() == [titles[i] for i in order]


def test_every_item_has_a_cover_and_an_h265_video_carrying_its_group(twin):
    from PIL import Image

    groups = plan(SPEC).groups()
    with zipfile.ZipFile(twin["covers"]) as zf:
        for item, (group, _) in groups.items():
            with zf.open(f"{COVERS_DIR}/{item}.jpg") as fh:
                assert frame_group(Image.open(fh), SPEC.n_groups) == group
    codec = "hevc" if hevc_support()["encoder"] else "h264"
    for item in groups:
        with av.open(str(twin["videos"] / f"{item}.mp4")) as c:
            stream = c.streams.video[0]
            assert stream.codec_context.name == codec
            assert (stream.width, stream.height) == (SPEC.video.size,) * 2
            assert SPEC.video.min_frames <= stream.frames <= SPEC.video.max_frames
            assert stream.average_rate == SPEC.video.fps


def test_the_pyav_wheel_encodes_and_decodes_h265():
    assert hevc_support() == {"decoder": True, "encoder": True, "round_trip": True}


def test_a_seed_gives_identical_bytes(twin, tmp_path):
    again = generate(tmp_path / "again", SPEC)
    assert _tree(again["pairs"].parent) == _tree(twin["pairs"].parent)  # MP4s included
    generate(tmp_path / "again", SPEC)  # regenerating in place replaces the videos folder
    assert _tree(tmp_path / "again") == _tree(twin["pairs"].parent)
    other = generate(tmp_path / "other", {"n_items": 40, "n_users": 60, "seed": 8, "video": {"min_frames": 12, "max_frames": 20}})
    assert other["titles"].read_bytes() != twin["titles"].read_bytes()
    assert not list(tmp_path.glob("*/.*"))  # no temporaries left


def test_the_spec_is_the_demos_with_its_own_size_and_the_twins_settings():
    """MicroLensDemoSpec extends DemoSpec: the planted structure's fields in DemoSpec's order with
    its defaults, except a smaller default size, then the titles' quirks and the videos."""
    demo, twin = dataclasses.fields(DemoSpec), dataclasses.fields(MicroLensDemoSpec)
    assert issubclass(MicroLensDemoSpec, DemoSpec) and [f.name for f in twin[:len(demo)]] == [f.name for f in demo]
    assert [f.name for f in twin[len(demo):]] == ["p_comma", "p_quoted", "video"]
    own = {"n_items": (1200, 300), "n_users": (2000, 400)}
    for a, b in zip(demo, twin):
        assert (a.default, b.default) == own.get(a.name, (a.default, a.default))


def test_h264_on_request_and_bad_specs(tmp_path):
    spec = MicroLensDemoSpec(n_items=8, n_users=5, video=VideoSpec(codec="h264", min_frames=6, max_frames=6))
    paths = generate(tmp_path, spec)
    with av.open(str(next(paths["videos"].iterdir()))) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    with pytest.raises(ValueError, match="multiple of 16"):
        generate(tmp_path / "x", MicroLensDemoSpec(video=VideoSpec(size=40)))
    with pytest.raises(ValueError, match="codec"):
        generate(tmp_path / "y", MicroLensDemoSpec(n_items=8, n_users=2, video=VideoSpec(codec="vp9")))


@pytest.mark.slow
def test_a_replaced_video_reruns_its_frames_and_caption_only(root, tmp_path):
    """On the twin in a workflow copy, video captions in 3 shards, a corrupt video skipped: once
    replaced by a good one, the rerun extracts that video alone and recaptions its item alone (the
    other shards reuse every caption), and frames.json lists it as extracted; with nothing
    changed, or a video merely touched, there is nothing to do."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    wd = tmp_path / "wf"
    wd.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        (shutil.copytree if (root / name).is_dir() else shutil.copy)(root / name, wd / name)
    spec = {"n_items": 12, "n_users": 30, "video": {"min_frames": 6, "max_frames": 8}}
    config = [f"dataset_sources={{mldemo: {{kind: microlens-demo, microlens_demo: {json.dumps(spec)}}}}}",
              "captions={max_new_tokens: 3, missing_videos: skip, shards: 3}", "standin_corpus=mldemo"]
    target = "resources/mldemo/captions/video.parquet"

    def snakemake(*targets, dry_run=False):
        res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *(["-n"] if dry_run else []), "--config", *config,
                              "--", *targets], cwd=wd,
                             capture_output=True, text=True)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        return res.stdout + res.stderr

    snakemake("resources/mldemo/items.parquet")
    videos = wd / "resources/raw/mldemo/MicroLens-100k_videos"
    items = pl.read_parquet(wd / "resources/mldemo/items.parquet")["item_id"].to_list()
    bad = videos / f"{items[0]}.mp4"
    good = bad.read_bytes()
    bad.write_bytes(b"\x00" * 64)
    snakemake(target)
    frames = json.loads((wd / "resources/mldemo/frames.json").read_text())
    assert frames["skipped_items"] == [str(items[0])]
    first = dict(pl.read_parquet(wd / target).iter_rows())

    bad.write_bytes(good)
    out = snakemake(target)
    assert "Nothing to be done" not in out
    frames = json.loads((wd / "resources/mldemo/frames.json").read_text())
    assert frames["skipped_items"] == [] and frames["reused"] == len(items) - 1
    now = dict(pl.read_parquet(wd / target).iter_rows())
    assert now[items[0]] != first[items[0]] and {i: now[i] for i in items[1:]} == {i: first[i] for i in items[1:]}
    logs = {k: (wd / f"logs/captions/mldemo/video.{k}-of-3.log").read_text() for k in (1, 2, 3)}
    mine = next(k for k in (1, 2, 3) if items[0] in shards.shard_items(items, k, 3))
    for k, text in logs.items():
        n = len(shards.shard_items(items, k, 3))
        done = n - 1 if k == mine else n
        assert f"{done} of {n} items captioned already" in text, (k, text[-1500:])

    os.utime(videos / f"{items[1]}.mp4")
    assert "Nothing to be done" in snakemake(target, dry_run=True)
