"""Frames of videos (iisan.frames) on the MicroLens demo twin's videos."""

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iisan import folders, frames
from iisan.data.amazon import DataError
from iisan.data.microlens_demo import MicroLensDemoSpec, frame_group, generate, plan
from iisan.frames import MANIFEST_MEMBER, POSITIONS, VideoError, count_frames, extract_all, extract_frames, frame_indices

av = pytest.importorskip("av")

SPEC = MicroLensDemoSpec(n_items=16, n_users=4, seed=3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("twin"), SPEC)["videos"]


def _all_frames(video: Path) -> list[np.ndarray]:
    with av.open(str(video)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_frame_indices_round_half_up():
    assert frame_indices(1) == [0, 0, 0]
    assert frame_indices(2, (0.0, 0.5, 1.0)) == [0, 1, 1]  # 0.5 rounds up, not to even
    assert frame_indices(11) == [1, 5, 9] and frame_indices(30) == [3, 15, 26]
    for bad in [(), (1.5,), (-0.1,), ("0.5",), (True,)]:
        with pytest.raises(ValueError):
            frame_indices(10, bad)


def test_three_frames_differ_and_carry_the_items_group(videos):
    groups = plan(SPEC).groups()
    for item, (group, _) in groups.items():
        frames = extract_frames(videos / f"{item}.mp4")
        assert len(frames) == 3 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
        arrays = [np.asarray(f, dtype=float) for f in frames]
        for a, b in [(0, 1), (1, 2), (0, 2)]:
            assert np.abs(arrays[a] - arrays[b]).mean() > 5, item  # the shape moved
        assert [frame_group(f, SPEC.n_groups) for f in frames] == [group] * 3, item


def test_frames_are_the_decoded_frames_at_the_positions(videos):
    video = next(iter(sorted(videos.iterdir())))
    every = _all_frames(video)  # presentation order (the demo videos have B-frames)
    n = count_frames(video)
    with av.open(str(video)) as c:
        assert n == len(every) == c.streams.video[0].frames
    positions = (0.0, 0.25, 1.0, 0.25)
    got = extract_frames(video, positions)
    want = [every[i] for i in frame_indices(n, positions)]
    first, quarter, last, again = frame_indices(n, positions)
    assert (first, last, again) == (0, n - 1, quarter) and 0 < quarter < n - 1
    assert all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want))
    default = extract_frames(video)
    assert all(np.array_equal(np.asarray(g), every[i]) for g, i in zip(default, frame_indices(n, POSITIONS)))


def test_extract_all_writes_a_zip_and_a_manifest(videos, tmp_path):
    items = plan(SPEC).item_ids[:5]
    out = tmp_path / "frames.zip"
    manifest = extract_all(items, videos, out, positions=(0.2, 0.8))
    assert manifest["positions"] == [0.2, 0.8]
    assert (manifest["items"], manifest["extracted"], manifest["skipped"], manifest["frames"]) == (5, 5, 0, 10)
    assert manifest["skipped_items"] == [] and manifest["skip_reasons"] == {}
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == [f"{i}_{k}.jpg" for i in items for k in (0, 1)] + [MANIFEST_MEMBER]
        assert json.loads(zf.read(MANIFEST_MEMBER)) == manifest
        with zf.open(f"{items[0]}_1.jpg") as fh:
            assert Image.open(fh).size == (32, 32)
    first = out.read_bytes()
    extract_all(items, videos, out, positions=(0.2, 0.8))
    assert out.read_bytes() == first  # deterministic archive
    assert [p.name for p in tmp_path.iterdir()] == ["frames.zip"]


@pytest.fixture
def damaged(videos, tmp_path) -> tuple[Path, list[str]]:
    """A videos folder: 3 good videos, a truncated one, a garbage one, and a missing one."""
    folder = tmp_path / "videos"
    folder.mkdir()
    items = plan(SPEC).item_ids[:6]
    for item in items[:4]:
        (folder / f"{item}.mp4").write_bytes((videos / f"{item}.mp4").read_bytes())
    data = (folder / f"{items[3]}.mp4").read_bytes()
    (folder / f"{items[3]}.mp4").write_bytes(data[: len(data) // 2])  # truncated
    (folder / f"{items[4]}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # garbage
    return folder, items  # items[5]: missing


def test_damaged_and_missing_videos_are_named_errors(damaged, tmp_path):
    folder, items = damaged
    out = tmp_path / "frames.zip"
    out.write_bytes(b"old")
    for bad in items[3:]:
        video = folder / f"{bad}.mp4"
        with pytest.raises(VideoError, match=str(video)):
            extract_frames(video)
        with pytest.raises(VideoError, match=rf"item '{bad}': {video}.*missing='skip'") as err:
            extract_all([items[0], bad], folder, out)
        assert isinstance(err.value, DataError)
        assert out.read_bytes() == b"old"  # untouched: written atomically
    with pytest.raises(VideoError, match="no such video file"):
        extract_frames(folder / f"{items[5]}.mp4")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_skip_mode_counts_the_skipped_items(damaged, tmp_path):
    folder, items = damaged
    out = tmp_path / "frames.zip"
    manifest = extract_all(items, folder, out, missing="skip")
    assert (manifest["items"], manifest["extracted"], manifest["skipped"], manifest["frames"]) == (6, 3, 3, 9)
    assert manifest["skipped_items"] == items[3:]
    assert "no such video file" in manifest["skip_reasons"][items[5]]
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == [f"{i}_{k}.jpg" for i in items[:3] for k in range(3)] + [MANIFEST_MEMBER]
    with pytest.raises(ValueError, match="missing"):
        extract_all(items, folder, out, missing="blank")
    with pytest.raises(ValueError, match="twice"):
        extract_all([items[0], items[0]], folder, out)


def _members(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {n: zf.read(n) for n in zf.namelist() if n != MANIFEST_MEMBER}


def test_frames_of_unchanged_videos_are_reused(damaged, videos, tmp_path, monkeypatch):
    """Against the previous archive, only a replaced, added or removed video is decoded again; the
    other items keep their frames (or their skip) byte for byte."""
    folder, items = damaged
    out = tmp_path / "frames.zip"
    first = extract_all(items, folder, out, missing="skip", previous=out)
    assert first["reused"] == 0 and set(first["video_sha256"]) == set(items[:5])
    before = _members(out)
    decoded = []
    real = frames.extract_frames
    monkeypatch.setattr(frames, "extract_frames", lambda path, positions: decoded.append(path.stem) or real(path, positions))

    # nothing changed: nothing decoded (but the missing video's path), the same archive
    again = extract_all(items, folder, out, missing="skip", previous=out)
    assert decoded == [items[5]] and again["reused"] == 5 and _members(out) == before  # items[5] has no video: tried again
    decoded.clear()
    # the garbage video replaced by a good one, a video added for the missing item, a good one removed
    (folder / f"{items[4]}.mp4").write_bytes((videos / f"{items[4]}.mp4").read_bytes())
    (folder / f"{items[5]}.mp4").write_bytes((videos / f"{items[5]}.mp4").read_bytes())
    (folder / f"{items[0]}.mp4").unlink()
    m = extract_all(items, folder, out, missing="skip", previous=out)
    assert sorted(decoded) == sorted([items[0], items[4], items[5]])
    assert m["skipped_items"] == [items[0], items[3]] and m["reused"] == 3  # items[1], items[2], and items[3]'s skip
    after = _members(out)
    assert {n: after[n] for n in after if n.startswith((items[1], items[2]))} == \
        {n: before[n] for n in before if n.startswith((items[1], items[2]))}
    assert f"{items[4]}_0.jpg" in after and f"{items[0]}_0.jpg" not in after
    # other positions: nothing reused
    decoded.clear()
    assert extract_all(items, folder, out, positions=(0.2, 0.8), missing="skip", previous=out)["reused"] == 0
    assert len(decoded) == len(items)


def test_a_content_manifest_changes_only_with_the_content(damaged, tmp_path, monkeypatch):
    folder, items = damaged
    manifest = tmp_path / "videos.content.json"
    assert folders.refresh_manifest(folder, manifest, "*.mp4")
    files = json.loads(manifest.read_text())["files"]
    assert sorted(files) == sorted(f"{i}.mp4" for i in items[:5])
    assert files[f"{items[0]}.mp4"]["sha256"] == folders.file_sha256(folder / f"{items[0]}.mp4")
    hashed = []
    real = folders.file_sha256
    monkeypatch.setattr(folders, "file_sha256", lambda path, *a: hashed.append(path.name) or real(path, *a))
    stamp = manifest.stat().st_mtime_ns
    # unchanged: no file read, the manifest untouched
    assert not folders.refresh_manifest(folder, manifest, "*.mp4") and hashed == [] and manifest.stat().st_mtime_ns == stamp
    # touched, same bytes: read once (new mtime), the manifest untouched
    video = folder / f"{items[1]}.mp4"
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    assert not folders.refresh_manifest(folder, manifest, "*.mp4") and hashed == [video.name]
    # replaced in place with other bytes of the same size, then one removed
    data = bytearray(video.read_bytes())
    data[-1] ^= 0xFF
    video.write_bytes(bytes(data))
    assert folders.refresh_manifest(folder, manifest, "*.mp4")
    assert json.loads(manifest.read_text())["files"][video.name]["sha256"] == real(video)
    (folder / f"{items[2]}.mp4").unlink()
    assert folders.refresh_manifest(folder, manifest, "*.mp4")
    assert f"{items[2]}.mp4" not in json.loads(manifest.read_text())["files"]
    assert folders.current_manifest(folder, manifest, "*.mp4") == json.loads(manifest.read_text())
