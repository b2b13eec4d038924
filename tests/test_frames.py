"""Frames of videos (iisan.frames) on the MicroLens demo twin's videos."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iisan.data.amazon import DataError
from iisan.data.microlens_demo import MicroLensDemoSpec, frame_group, generate, plan
from iisan.frames import POSITIONS, VideoError, count_frames, extract_all, extract_frames, frame_indices

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
        assert zf.namelist() == [f"{i}_{k}.jpg" for i in items for k in (0, 1)]
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
        assert zf.namelist() == [f"{i}_{k}.jpg" for i in items[:3] for k in range(3)]
    with pytest.raises(ValueError, match="missing"):
        extract_all(items, folder, out, missing="blank")
    with pytest.raises(ValueError, match="twice"):
        extract_all([items[0], items[0]], folder, out)
