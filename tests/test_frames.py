"""Frames of videos (iisan.data.frames) on the MicroLens demo twin's videos."""

import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iisan.data import folders, frames
from iisan.data.errors import DataError
from iisan.data.frames import MANIFEST_MEMBER, POSITIONS, VideoError, count_frames, extract_all, extract_frames, frame_indices
from iisan.data.microlens_demo import MicroLensDemoSpec, frame_group, generate, plan
from iisan.pipeline import budget

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
    monkeypatch.setattr(frames, "extract_frames", lambda path, positions, **kw: decoded.append(path.stem) or real(path, positions, **kw))

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


# --- parallel and resumable extraction ------------------------------------------------------
def _copy_videos(videos: Path, folder: Path, items) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        (folder / f"{item}.mp4").write_bytes((videos / f"{item}.mp4").read_bytes())
    return folder


class Killed(Exception):
    """Stands for the job's end part-way (a time-out): raised by the n-th decode."""


def _die_at(monkeypatch, n: int) -> list[str]:
    """Make the n-th call of extract_frames raise `Killed`; returns the stems it was called on."""
    calls, real = [], frames.extract_frames

    def extract(path, positions, **kw):
        calls.append(path.stem)
        if len(calls) == n:
            raise Killed(path.stem)
        return real(path, positions, **kw)

    monkeypatch.setattr(frames, "extract_frames", extract)
    return calls


def _parts(out: Path) -> list[str]:
    return sorted(p.name for p in frames.work_folder(out).glob("part-*.zip"))


def test_threads_give_the_same_archive(damaged, tmp_path):
    folder, items = damaged
    runs = {}
    for threads in (1, 3):
        out = tmp_path / f"t{threads}" / "frames.zip"
        runs[threads] = extract_all(items, folder, out, missing="skip", threads=threads), out.read_bytes()
    assert runs[1] == runs[3]
    video = folder / f"{items[0]}.mp4"
    assert [np.asarray(f).tobytes() for f in extract_frames(video, threads=1)] == \
        [np.asarray(f).tobytes() for f in extract_frames(video, threads=0)]
    with pytest.raises(ValueError, match="threads"):
        extract_all(items, folder, tmp_path / "x.zip", threads=0)


def test_an_interrupted_run_resumes_to_the_same_archive(damaged, tmp_path, monkeypatch):
    """Killed at its third video, a run has kept the finished ones in parts; the next run decodes
    only the others and writes the archive and manifest an uninterrupted run writes."""
    folder, items = damaged
    ref = tmp_path / "ref" / "frames.zip"
    want = extract_all(items, folder, ref, missing="skip")
    out = tmp_path / "frames.zip"
    calls = _die_at(monkeypatch, 3)
    with pytest.raises(Killed):
        extract_all(items, folder, out, missing="skip", flush_s=0)
    assert not out.exists() and _parts(out)  # nothing written but the parts
    kept = set(frames._Work(frames.work_folder(out), POSITIONS, 95).found)
    assert set(items[:2]) <= kept and items[2] not in kept
    calls.clear()
    monkeypatch.setattr(frames, "extract_frames", lambda path, positions, **kw: calls.append(path.stem) or real(path, positions, **kw))
    got = extract_all(items, folder, out, missing="skip", flush_s=0)
    assert sorted(calls) == sorted(set(items) - kept)  # items[5], without a video, is tried every time
    assert got == want and out.read_bytes() == ref.read_bytes()
    assert not frames.work_folder(out).exists()


real = frames.extract_frames


def test_resuming_with_a_previous_archive_and_changed_videos(videos, tmp_path, monkeypatch):
    """Reuse of unchanged videos' frames and resuming together: the run that completes after
    two interruptions equals an uninterrupted one from the same previous archive."""
    items = plan(SPEC).item_ids[:10]
    folder = _copy_videos(videos, tmp_path / "videos", items[:8])
    out = tmp_path / "frames.zip"
    extract_all(items[:8], folder, out)
    # three videos replaced by others, two added
    for a, b in [(0, 9), (3, 8), (5, 10)]:
        (folder / f"{items[a]}.mp4").write_bytes((videos / f"{plan(SPEC).item_ids[b]}.mp4").read_bytes())
    _copy_videos(videos, folder, items[8:])
    previous = tmp_path / "previous.zip"
    previous.write_bytes(out.read_bytes())
    ref = tmp_path / "ref" / "frames.zip"
    want = extract_all(items, folder, ref, previous=previous, threads=2)
    assert (want["reused"], want["extracted"]) == (5, 10)
    kept = []
    for _ in range(2):  # each run decodes one video more than the last kept (and maybe others ahead)
        _die_at(monkeypatch, 2)
        with pytest.raises(Killed):
            extract_all(items, folder, out, previous=out, flush_s=0)
        assert out.read_bytes() == previous.read_bytes()  # the previous archive untouched
        kept.append(set(frames._Work(frames.work_folder(out), POSITIONS, 95).found))
    assert kept[0] and kept[0] < kept[1] and len(kept[1]) < 5
    calls = _die_at(monkeypatch, 0)
    got = extract_all(items, folder, out, previous=out, threads=2)
    assert sorted(calls) == sorted({items[i] for i in (0, 3, 5, 8, 9)} - kept[1])
    assert got == want and out.read_bytes() == ref.read_bytes()


def test_parts_of_other_settings_changed_videos_and_damaged_parts_are_not_used(damaged, videos, tmp_path, monkeypatch):
    folder, items = damaged
    out = tmp_path / "frames.zip"
    ref = tmp_path / "ref" / "frames.zip"
    _die_at(monkeypatch, 3)
    with pytest.raises(Killed):
        extract_all(items[:3], folder, out, quality=80, flush_s=0)
    assert len(_parts(out)) == 2
    calls = _die_at(monkeypatch, 0)
    extract_all(items[:3], folder, out, flush_s=0)  # quality 95: both parts ignored
    assert calls == items[:3] and not frames.work_folder(out).exists()

    _die_at(monkeypatch, 3)
    with pytest.raises(Killed):
        extract_all(items[:3], folder, out, previous=None, flush_s=0)
    work = frames.work_folder(out)
    first, second = sorted(work.glob("part-*.zip"))
    first.write_bytes(first.read_bytes()[:100])  # damaged
    (folder / f"{items[1]}.mp4").write_bytes((videos / f"{items[4]}.mp4").read_bytes())  # changed since
    (work / ".part-000009.zip.tmp").write_bytes(b"a part being written when the job was killed")
    calls = _die_at(monkeypatch, 0)
    got = extract_all(items[:3], folder, out, flush_s=0)
    assert calls == items[:3]
    assert got == extract_all(items[:3], folder, ref) and out.read_bytes() == ref.read_bytes()
    assert not work.exists()


KILLER = """
import os, signal, sys
from pathlib import Path
from iisan.data import frames
from iisan.pipeline import jobs
signal.signal(signal.SIGTERM, jobs._stop)  # as a workflow job has it
real, calls = frames.extract_frames, []
def extract(path, positions, **kw):
    calls.append(path.stem)
    if len(calls) == int(sys.argv[4]):
        os.kill(os.getpid(), getattr(signal, sys.argv[5]))
    return real(path, positions, **kw)
frames.extract_frames = extract
items = sys.argv[3].split(",")
frames.extract_all(items, Path(sys.argv[1]), Path(sys.argv[2]), threads=2, flush_s=float(sys.argv[6]))
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_job_resumes_to_the_same_archive(videos, tmp_path, sig):
    """A real job process killed at its 9th video (2 threads, so at least 7 had finished):
    SIGKILL loses what was not yet in a part (with parts after every video, at most the last
    few); SIGTERM, as the workflow's jobs take it, keeps every finished video even with an hour
    between parts. The next run decodes the rest and writes the uninterrupted run's archive."""
    import subprocess
    import sys

    items = plan(SPEC).item_ids
    out, ref = tmp_path / "frames.zip", tmp_path / "ref" / "frames.zip"
    flush_s = 0 if sig == "SIGKILL" else 3600
    run = subprocess.run([sys.executable, "-c", KILLER, str(videos), str(out), ",".join(items), "9", sig, str(flush_s)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(frames.__file__).parents[1])})
    if sig == "SIGKILL":
        assert run.returncode == -9, run.stderr
    else:
        assert run.returncode == 1 and "JobStopped: SIGTERM" in run.stderr, run.stderr
    kept = frames._Work(frames.work_folder(out), POSITIONS, 95).found
    assert not out.exists() and (1 if sig == "SIGKILL" else 7) <= len(kept) < len(items)
    want = extract_all(items, videos, ref)
    assert extract_all(items, videos, out, threads=2) == want and out.read_bytes() == ref.read_bytes()


def test_the_job_is_sized_from_the_measured_rate():
    rates = {"frames": {"video_s": 9.0, "assemble_item_s": 0.01,
                        "video": {"width": 1080, "height": 1920, "fps": 30, "seconds": 60}}}
    config = {"cluster": {"runtime_margin": 1.5},
              "dataset_sources": {"MicroLens": {"kind": "microlens"},
                                  "twin": {"kind": "microlens-demo", "microlens_demo": {"n_items": 300, "n_users": 400}}}}
    items = 19_738
    assert budget.frames_seconds(config, "MicroLens", 1, rates) == pytest.approx(items * 9.01)
    assert budget.frames_threads(config, "MicroLens", rates) == budget.FRAMES_MAX_THREADS
    assert budget.frames_minutes(config, "MicroLens", 8, rates) == math.ceil(items * (9.0 / 8 + 0.01) * 1.5 / 60)
    assert budget.frames_minutes(config, "MicroLens", rates=rates) == budget.frames_minutes(config, "MicroLens", 8, rates)
    # the twin's 32 x 32 videos of at most 40 frames: a few seconds, the floor
    assert budget.frames_seconds(config, "twin", 1, rates) < 60
    assert budget.frames_threads(config, "twin", rates) == 1 and budget.frames_minutes(config, "twin", rates=rates) == budget.FLOOR_MIN
    # the repository's own rate is there
    assert budget.frames_minutes({"dataset_sources": {}}, "MicroLens", 1) > 120
