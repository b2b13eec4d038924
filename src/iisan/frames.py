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
FFmpeg cannot open or decode, one without a video stream, and one without frames.

`extract_all` runs this over items, ``<videos_dir>/<item_id>.mp4`` each, into a zip archive of
``<item_id>_<k>.jpg`` members (k = index of the position) written atomically, and returns a
manifest. A missing or undecodable video is an error naming the item and file; with
``missing="skip"`` it is skipped, counted and listed in the manifest instead. The manifest keeps
each video's sha256; given the previous archive and manifest, an item whose video has the same
sha256 (under the same positions and JPEG quality) takes its frames, or its skip, from there
without decoding, so a replaced, added or removed video is the only one extracted again.

`read_frames` is the reading side: the frame names of an archive after checking it (every
member's CRC, and the frame count of its manifest ``frames.json`` beside it); a damaged archive
is moved aside so that the workflow's next run extracts the frames again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from .data.amazon import DataError
from .io import atomic_path, read_json, read_or_set_aside

log = logging.getLogger(__name__)

POSITIONS = (0.1, 0.5, 0.9)
MANIFEST_MEMBER = "frames.json"  # the archive's own manifest: what its frames were extracted from
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same videos give the same archive


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


def extract_frames(video: Path, positions: Sequence[float] = POSITIONS) -> list[Image.Image]:
    """The frames at `positions` (fractions of the frame count) of `video`, as RGB images, in the
    order of `positions` (a repeated position gives the frame again)."""
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
) -> dict:
    """Extract the frames at `positions` of ``<videos_dir>/<item_id>.mp4`` for each item into the
    zip archive `out_zip` (members ``<item_id>_<k>.jpg``, k the index of the position; JPEG at
    `quality`), written atomically. A missing or undecodable video raises `VideoError` naming the
    item and file, or with ``missing="skip"`` is skipped and counted. Returns the manifest:
    positions, JPEG quality, member pattern, counts (items, extracted, skipped, frames, and reused:
    the items whose frames or skip came from `previous`),
    the skipped item ids with the reason for each, and the sha256 of each item's video.

    The manifest is also the archive's last member, ``frames.json``. `video_sha256` maps video
    file names to their sha256 (a content manifest's, `iisan.folders`; a file it leaves out is
    read here). `previous` is an earlier run's archive, which may be `out_zip` itself: items whose
    video is unchanged take their frames or skip from it (module docstring)."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'skip'")
    from .folders import file_sha256

    positions = check_positions(positions)
    videos_dir, out_zip = Path(videos_dir), Path(out_zip)
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
    extracted = reused = 0
    with contextlib.ExitStack() as stack:
        old_zip, old = _previous(previous, positions, quality) or (None, {})
        if old_zip is not None:
            stack.enter_context(old_zip)
        old_sha, old_skips = old.get("video_sha256") or {}, old.get("skip_reasons") or {}
        old_members = set(old_zip.namelist()) if old_zip else set()
        tmp = stack.enter_context(atomic_path(out_zip, ".zip"))
        zf = stack.enter_context(zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED))
        for item in item_ids:
            path = videos_dir / f"{item}.mp4"
            sha = video_sha256.get(path.name) or (file_sha256(path) if path.is_file() else None)
            if sha is not None:
                shas[item] = sha
            names = [f"{item}_{k}.jpg" for k in range(len(positions))]
            if sha is not None and old_sha.get(item) == sha:
                if item in old_skips and missing == "skip":
                    skipped[item] = old_skips[item]
                    reused += 1
                    continue
                if item not in old_skips and all(n in old_members for n in names):
                    try:
                        kept = [old_zip.read(n) for n in names]
                    except (OSError, zipfile.BadZipFile) as err:  # a damaged member: extracted again
                        log.warning("%s: frames of item %r unreadable (%s); extracting them again", previous, item, err)
                    else:
                        for n, data in zip(names, kept):
                            zf.writestr(zipfile.ZipInfo(n, date_time=_ZIP_TIME), data)
                        extracted += 1
                        reused += 1
                        continue
            try:
                frames = extract_frames(path, positions)
            except VideoError as err:
                if missing == "error":
                    raise VideoError(f"item {item!r}: {err} (set missing='skip' to skip and count such items)") from err
                log.warning("skipping item %r: %s", item, err)
                skipped[item] = str(err)
                continue
            for n, image in zip(names, frames):
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=quality)
                zf.writestr(zipfile.ZipInfo(n, date_time=_ZIP_TIME), buf.getvalue())
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
