"""Frames of videos: a few frames at fixed fractions of each video, decoded with PyAV.

`extract_frames(video, positions)` returns the frames at frame indices
``floor(p * (n - 1) + 0.5)`` (p * (n - 1) rounded half up, not Python's half-to-even `round`;
`frame_indices`) for each position p in [0, 1], in the order of `positions`, as RGB PIL images.

How n (the frame count) is found: by DEMUXING, not decoding: n is the number of the video
stream's packets that carry data and are not marked discard (FFmpeg's MP4 demuxer marks the
packets an edit list cuts, and the decoder drops their frames; no test here has an edit list).
For MP4 with H.264/H.265, the MicroLens videos, one packet is one frame, so this is the number
of frames the decoder returns, at the cost of reading the file once without decoding. The
header's frame count (``stream.frames``) is not used: it is 0 in some containers and may count
the frames an edit list cuts (for the demo videos it equals both counts; tested). The frames are
then decoded in order (B-frames reordered by the decoder) up to the last wanted index only, so a
video costs one demux pass plus decoding up to max(positions) of its length. A decoder that
delivers fewer frames than the packets promised is an error (the video is damaged), as is a file
FFmpeg cannot open or decode, one without a video stream, and one without frames. The number of
decoder threads changes the speed, not the pixels: FFmpeg's H.264 and H.265 decoders give the
same frames with any number of threads.

`extract_all` runs this over items, ``<videos_dir>/<item_id>.mp4`` each, into a zip archive of
``<item_id>_<k>.jpg`` members (k = index of the position) written atomically, and returns a
manifest. A missing or undecodable video is an error naming the item and file; with
``missing="skip"`` it is skipped, counted and listed in the manifest instead. The manifest keeps
each video's sha256; given the previous archive and manifest, an item whose video has the same
sha256 (under the same positions and JPEG quality) takes its frames, or its skip, from there
without decoding, so a replaced, added or removed video is the only one extracted again.

Parallel and resumable: the videos to decode are decoded `threads` at a time (a thread pool, one
decoder thread per video; PyAV releases the GIL while it demuxes and decodes), and the finished
ones are kept in a work folder beside the archive (``<archive>.parts/``, `work_folder`) as the
run goes: every `flush_s` seconds the frames (or the skip reason) of the videos finished since
the last part go into a new ``part-<n>.zip``, written atomically, and when the run stops on an
exception (a failed video, or SIGTERM, which `iisan.pipeline.jobs` turns into `JobStopped`) the finished
ones not yet kept go into one more part. A part records the positions, the JPEG quality and each
item's video sha256. A run that finds parts there takes an item from them, as it does from the
previous archive, when its video's sha256 and the settings match, and decodes the others. So a
job killed with SIGKILL loses at most the last `flush_s` seconds of decoding (one stopped with
SIGTERM loses only the videos it was decoding), and the archive the run that completes writes is
the one an uninterrupted run writes, byte for byte: its members are written in item order,
whatever order the videos finished in, and its manifest counts an item taken from a part as the
run that decoded it counted it. An unreadable part, or a member whose CRC fails, only means that
its videos are decoded again. Once the archive is in place the work folder is removed. Items
without a video file are not kept in parts (trying them again costs nothing).

`read_frames` is the reading side: the frame names of an archive after checking it (every
member's CRC, and the frame count of its manifest ``frames.json`` beside it); a damaged archive
is moved aside so that the workflow's next run extracts the frames again.

`iisan.pipeline.budget.frames_minutes` and `frames_threads` size the workflow's frames job from the
measured extraction rate under ``frames:`` in rates.yaml (benchmarks/frames_speed.py).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import math
import re
import shutil
import time
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from iisan.data.errors import DataError
from iisan.io import atomic_path, read_json, read_or_set_aside

log = logging.getLogger(__name__)

POSITIONS = (0.1, 0.5, 0.9)
MANIFEST_MEMBER = "frames.json"  # the archive's own manifest: what its frames were extracted from
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same videos give the same archive
PART_MEMBER = "part.json"  # a work part's own record: settings, and each item's sha256 and skip
FLUSH_S = 60.0  # seconds of decoding between two parts of the work folder (the most a SIGKILL loses)


class VideoError(DataError):
    """A video that is missing or cannot be decoded; the message names the file (and item)."""


def check_positions(positions: Iterable[float]) -> tuple[float, ...]:
    """The positions as floats; each must be a number in [0, 1], and there must be one."""
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"frame position {p!r}: expected a fraction of the video in [0, 1]")
        out.append(float(p))
    if not out:
        raise ValueError("no frame positions")
    return tuple(out)


def frame_indices(n: int, positions: Sequence[float] = POSITIONS) -> list[int]:
    """Frame index of each position in a video of `n` frames: p * (n - 1) rounded half up."""
    if n < 1:
        raise ValueError(f"a video of {n} frames")
    return [min(n - 1, math.floor(p * (n - 1) + 0.5)) for p in check_positions(positions)]


def _fail(video: Path, what: str) -> VideoError:
    return VideoError(f"{video}: {what}")


def count_frames(video: Path) -> int:
    """The number of frames of the first video stream, counted by demuxing (see the module
    docstring); errors are `VideoError`s naming the file."""
    import av

    video = Path(video)
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise _fail(video, "no video stream")
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size and not packet.is_discard)
    except av.FFmpegError as err:
        raise _fail(video, f"cannot read the video ({type(err).__name__}: {err})") from err


def extract_frames(video: Path, positions: Sequence[float] = POSITIONS, *, threads: int = 0) -> list[Image.Image]:
    """The frames at `positions` (fractions of the frame count) of `video`, as RGB images, in the
    order of `positions` (a repeated position gives the frame again). `threads`: the decoder's
    threads (0: FFmpeg's choice, about one per core), the same frames either way."""
    import av

    video = Path(video)
    positions = check_positions(positions)
    if not video.is_file():
        raise _fail(video, "no such video file")
    n = count_frames(video)
    if n == 0:
        raise _fail(video, "no frames")
    indices = frame_indices(n, positions)
    wanted = set(indices)
    last = max(indices)
    got: dict[int, Image.Image] = {}
    decoded = 0
    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in wanted:
                    got[index] = frame.to_image().convert("RGB")
                if index >= last:
                    break
    except av.FFmpegError as err:
        raise _fail(video, f"cannot decode frame {decoded} of {n} ({type(err).__name__}: {err})") from err
    if last not in got:
        raise _fail(video, f"decoded only {decoded} of its {n} frames")
    return [got[i] for i in indices]


def _previous(archive: Path | None, positions: tuple[float, ...], quality: int) -> tuple[zipfile.ZipFile, dict] | None:
    """The open previous archive and the manifest it holds, when its frames can be reused: same
    positions and JPEG quality (None otherwise, or when it is missing or unreadable: logged)."""
    if archive is None or not Path(archive).is_file():
        return None
    try:
        zf = zipfile.ZipFile(archive)
        manifest = json.loads(zf.read(MANIFEST_MEMBER))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        log.warning("not reusing the frames of %s: no readable %s in it (%s)", archive, MANIFEST_MEMBER, err)
        return None
    if manifest.get("positions") != list(positions) or manifest.get("quality") != quality:
        log.info("not reusing the frames of %s: made at other positions or JPEG quality", archive)
        zf.close()
        return None
    return zf, manifest


def work_folder(out_zip: Path) -> Path:
    """Where `extract_all` keeps the frames of finished videos until `out_zip` is written:
    ``<out_zip>.parts`` beside it."""
    out_zip = Path(out_zip)
    return out_zip.with_name(out_zip.name + ".parts")


class _Work:
    """The work folder of `extract_all`: parts ``part-<n>.zip`` of finished videos' frames (the
    module docstring). `found` maps an item to (its part, its video's sha256, its skip reason or
    None) for the parts made at this run's positions and JPEG quality; a later part wins."""

    _OPEN = 4  # parts kept open at once while the archive is assembled

    def __init__(self, folder: Path, positions: tuple[float, ...], quality: int):
        self.folder, self.positions, self.quality = Path(folder), list(positions), quality
        self.found: dict[str, tuple[Path, str, str | None]] = {}
        self._open: collections.OrderedDict[Path, zipfile.ZipFile] = collections.OrderedDict()
        self._next = 0
        numbered = []
        for part in (self.folder.glob("part-*.zip") if self.folder.is_dir() else ()):
            m = re.fullmatch(r"part-(\d+)\.zip", part.name)
            if m:
                numbered.append((int(m[1]), part))
        for n, part in sorted(numbered):
            self._next = max(self._next, n + 1)
            try:
                with zipfile.ZipFile(part) as zf:
                    meta = json.loads(zf.read(PART_MEMBER))
                    names = set(zf.namelist())
                if meta.get("positions") != self.positions or meta.get("quality") != self.quality:
                    log.info("%s: made at other positions or JPEG quality; not used", part)
                    continue
                records = {str(item): (str(r["sha256"]), r.get("skip")) for item, r in meta["items"].items()}
            except (OSError, KeyError, TypeError, AttributeError, ValueError, zipfile.BadZipFile) as err:
                log.warning("%s: unreadable (%s); its videos are decoded again", part, err)
                continue
            for item, (sha, skip) in records.items():
                if skip is None and not all(f"{item}_{k}.jpg" in names for k in range(len(positions))):
                    continue
                self.found[item] = (part, sha, None if skip is None else str(skip))

    def get(self, item: str, sha: str | None) -> tuple[Path, str, str | None] | None:
        """The part's record of `item` when it was made from a video of this `sha`."""
        record = self.found.get(item)
        return record if record is not None and sha is not None and record[1] == sha else None

    def read(self, item: str, names: Sequence[str]) -> list[bytes]:
        """The members `names` of the part holding `item` (each checked against its CRC)."""
        part = self.found[item][0]
        zf = self._open.pop(part, None) or zipfile.ZipFile(part)
        self._open[part] = zf
        while len(self._open) > self._OPEN:
            self._open.popitem(last=False)[1].close()
        return [zf.read(n) for n in names]

    def write(self, done: dict[str, tuple[str, str | None, list[bytes] | None]]) -> Path:
        """A new part of `done`: item -> (video sha256, skip reason or None, JPEGs or None)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{self._next:06d}.zip"
        self._next += 1
        meta = {"positions": self.positions, "quality": self.quality,
                "items": {item: {"sha256": sha, "skip": skip} for item, (sha, skip, _) in done.items()}}
        with atomic_path(path, ".zip") as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for item, (_, _, jpegs) in done.items():
                for k, data in enumerate(jpegs or ()):
                    zf.writestr(zipfile.ZipInfo(f"{item}_{k}.jpg", date_time=_ZIP_TIME), data)
            zf.writestr(zipfile.ZipInfo(PART_MEMBER, date_time=_ZIP_TIME), json.dumps(meta))
        for item, (sha, skip, _) in done.items():
            self.found[item] = (path, sha, skip)
        return path

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def _jpegs(video: Path, positions: tuple[float, ...], quality: int) -> list[bytes]:
    """The frames of `video` at `positions` as JPEG bytes (one decoder thread: `extract_all`
    decodes several videos side by side instead)."""
    out = []
    for image in extract_frames(video, positions, threads=1):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _skip_or_raise(item: str, err: VideoError, missing: str) -> str:
    """The skip reason of `item`, or with ``missing="error"`` the error naming it."""
    if missing == "error":
        raise VideoError(f"item {item!r}: {err}; to skip such items (counted and listed in the frames manifest), set the "
                         "config key captions.missing_videos: skip (iisan.data.frames.extract_all's missing='skip')") from err
    log.warning("skipping item %r: %s", item, err)
    return str(err)


def _decode(todo: list[str], paths: dict[str, Path], shas: dict[str, str], positions: tuple[float, ...],
            quality: int, missing: str, threads: int, work: _Work, flush_s: float) -> dict[str, str]:
    """Decode the videos of `todo`, `threads` at a time, handled in the order of `todo` (the
    first failing one raises with ``missing="error"``), keeping the finished ones in parts of
    `work` (every `flush_s` seconds, at the end, and when stopped by an exception). Returns the
    skip reasons of items without a video file (not kept in parts)."""
    unkept: dict[str, str] = {}
    pending: dict[str, tuple[str, str | None, list[bytes] | None]] = {}
    window: collections.deque = collections.deque()  # (item, future), at most 4 x threads ahead
    queue = iter(todo)
    start = last = time.monotonic()
    finished = 0

    def keep() -> None:
        nonlocal pending
        part = work.write(pending)
        pending = {}
        elapsed = time.monotonic() - start
        log.info("%d of %d videos decoded in %.0f s (%.2f s per video per thread, %d threads); kept in %s",
                 finished, len(todo), elapsed, elapsed * threads / max(finished, 1), threads, part)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="frames") as pool:

        def fill() -> None:
            while len(window) < 4 * threads:
                item = next(queue, None)
                if item is None:
                    return
                window.append((item, pool.submit(_jpegs, paths[item], positions, quality)))

        try:
            fill()
            while window:
                item, future = window[0]
                try:
                    jpegs, skip = future.result(), None
                except VideoError as err:
                    jpegs, skip = None, _skip_or_raise(item, err, missing)
                window.popleft()
                fill()
                finished += 1
                if item in shas:
                    pending[item] = (shas[item], skip, jpegs)
                else:  # no video file: no sha256 to key a part's record by
                    unkept[item] = skip
                if pending and time.monotonic() - last >= flush_s:
                    keep()
                    last = time.monotonic()
        except BaseException:
            for item, future in window:  # finished ahead of the one that stopped the run
                future.cancel()
                if item in shas and future.done() and not future.cancelled() and future.exception() is None:
                    pending[item] = (shas[item], None, future.result())
            if pending:
                try:
                    keep()
                except Exception:  # noqa: BLE001 - the stopping exception is the one to raise
                    log.exception("could not keep the frames of %d finished videos", len(pending))
            raise
        if pending:
            keep()
    return unkept


def extract_all(
    item_ids: Iterable[str],
    videos_dir: Path,
    out_zip: Path,
    positions: Sequence[float] = POSITIONS,
    missing: str = "error",
    *,
    quality: int = 95,
    video_sha256: dict[str, str] | None = None,
    previous: Path | None = None,
    threads: int = 1,
    work: Path | None = None,
    flush_s: float = FLUSH_S,
) -> dict:
    """Extract the frames at `positions` of ``<videos_dir>/<item_id>.mp4`` for each item into the
    zip archive `out_zip` (members ``<item_id>_<k>.jpg``, k the index of the position; JPEG at
    `quality`), written atomically. A missing or undecodable video raises `VideoError` naming the
    item and file, or with ``missing="skip"`` is skipped and counted. Returns the manifest:
    positions, JPEG quality, member pattern, counts (items, extracted, skipped, frames, and reused:
    the items whose frames or skip came from `previous`),
    the skipped item ids with the reason for each, and the sha256 of each item's video.

    The manifest is also the archive's last member, ``frames.json``. `video_sha256` maps video
    file names to their sha256 (a content manifest's, `iisan.data.folders`; a file it leaves out is
    read here). `previous` is an earlier run's archive, which may be `out_zip` itself: items whose
    video is unchanged take their frames or skip from it (module docstring).

    `threads` videos are decoded at a time; `work` (default `work_folder(out_zip)`) keeps the
    finished ones every `flush_s` seconds, so that a run stopped part-way resumes from there
    (module docstring); it is removed once `out_zip` is written. Neither changes the archive."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'skip'")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: expected a positive integer")
    from iisan.data.folders import file_sha256

    positions = check_positions(positions)
    videos_dir, out_zip = Path(videos_dir), Path(out_zip)
    work = work_folder(out_zip) if work is None else Path(work)
    item_ids = [str(i) for i in item_ids]
    seen: set[str] = set()
    for item in item_ids:
        if item in seen:
            raise ValueError(f"item id {item!r} given twice")
        if not item or "/" in item or "\\" in item:
            raise ValueError(f"item id {item!r} cannot name a video file")
        seen.add(item)
    video_sha256 = video_sha256 or {}

    skipped: dict[str, str] = {}
    shas: dict[str, str] = {}
    paths = {item: videos_dir / f"{item}.mp4" for item in item_ids}
    extracted = reused = 0
    with contextlib.ExitStack() as stack:
        old_zip, old = _previous(previous, positions, quality) or (None, {})
        if old_zip is not None:
            stack.enter_context(old_zip)
        old_sha, old_skips = old.get("video_sha256") or {}, old.get("skip_reasons") or {}
        old_members = set(old_zip.namelist()) if old_zip else set()
        parts = _Work(work, positions, quality)
        stack.callback(parts.close)

        # where each item's frames come from: the previous archive, a part, or its video
        source: dict[str, str] = {}
        for item in item_ids:
            path = paths[item]
            sha = video_sha256.get(path.name) or (file_sha256(path) if path.is_file() else None)
            if sha is not None:
                shas[item] = sha
            names = [f"{item}_{k}.jpg" for k in range(len(positions))]
            if sha is not None and old_sha.get(item) == sha:
                if item in old_skips and missing == "skip":
                    source[item] = "previous skip"
                    continue
                if item not in old_skips and all(n in old_members for n in names):
                    source[item] = "previous"
                    continue
            kept = parts.get(item, sha)
            source[item] = "part" if kept is not None and (kept[2] is None or missing == "skip") else "video"
        todo = [item for item in item_ids if source[item] == "video"]
        counts = collections.Counter(source.values())
        log.info("%d items: %d from the previous archive, %d from the parts of an earlier run in %s, %d videos to decode "
                 "(%d threads)", len(item_ids), counts["previous"] + counts["previous skip"], counts["part"], work, len(todo), threads)
        unkept = _decode(todo, paths, shas, positions, quality, missing, threads, parts, flush_s)

        # the archive, in item order
        tmp = stack.enter_context(atomic_path(out_zip, ".zip"))
        zf = stack.enter_context(zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED))
        for item in item_ids:
            how = source[item]
            names = [f"{item}_{k}.jpg" for k in range(len(positions))]
            data = None
            if how == "previous skip":
                skipped[item] = old_skips[item]
                reused += 1
                continue
            if item in unkept:
                skipped[item] = unkept[item]
                continue
            if how == "previous":
                try:
                    data = [old_zip.read(n) for n in names]
                except (OSError, zipfile.BadZipFile) as err:  # a damaged member: extracted again
                    log.warning("%s: frames of item %r unreadable (%s); extracting them again", previous, item, err)
                else:
                    reused += 1
            else:  # decoded by this run or an earlier one: in a part
                skip = parts.found[item][2]
                if skip is not None:
                    skipped[item] = skip
                    continue
                try:
                    data = parts.read(item, names)
                except (OSError, zipfile.BadZipFile) as err:
                    log.warning("%s: frames of item %r unreadable (%s); extracting them again", work, item, err)
            if data is None:
                try:
                    data = _jpegs(paths[item], positions, quality)
                except VideoError as err:
                    skipped[item] = _skip_or_raise(item, err, missing)
                    continue
            for n, jpeg in zip(names, data):
                zf.writestr(zipfile.ZipInfo(n, date_time=_ZIP_TIME), jpeg)
            extracted += 1
        manifest = {
            "positions": list(positions),
            "quality": quality,
            "members": "<item_id>_<k>.jpg",
            "items": len(item_ids),
            "extracted": extracted,
            "reused": reused,
            "skipped": len(skipped),
            "frames": extracted * len(positions),
            "skipped_items": list(skipped),
            "skip_reasons": skipped,
            "video_sha256": shas,
        }
        zf.writestr(zipfile.ZipInfo(MANIFEST_MEMBER, date_time=_ZIP_TIME), json.dumps(manifest, indent=1))
    parts.close()
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def read_frames(archive: Path) -> set[str]:
    """The member names of a frames archive written by `extract_all`, after reading it once to
    check every member's CRC and, when its manifest (the ``.json`` beside it, as the workflow
    writes it) is there, that the archive holds the manifest's number of frames. A damaged
    archive or manifest is moved aside (`iisan.io.read_or_set_aside`) and the error names it."""
    archive = Path(archive)
    manifest = archive.with_suffix(".json")
    then = "the next run of the workflow extracts the frames again"
    expected = read_json(manifest, then=then) if manifest.is_file() else {}
    expected = expected.get("frames") if isinstance(expected, dict) else None

    def read(path: Path) -> set[str]:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"member {bad}: its CRC does not match")
            names = set(zf.namelist()) - {MANIFEST_MEMBER}
        if manifest.is_file() and len(names) != expected:
            raise ValueError(f"{len(names)} frames, but {manifest.name} beside it says {expected}")
        return names

    return read_or_set_aside(archive, read, then)
