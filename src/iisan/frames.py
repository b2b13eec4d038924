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
``missing="skip"`` it is skipped, counted and listed in the manifest instead.

`read_frames` is the reading side: the member names of an archive after checking it (every
member's CRC, and the frame count of its manifest ``frames.json`` beside it); a damaged archive
is moved aside so that the workflow's next run extracts the frames again.
"""

from __future__ import annotations

import io
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


def extract_all(
    item_ids: Iterable[str],
    videos_dir: Path,
    out_zip: Path,
    positions: Sequence[float] = POSITIONS,
    missing: str = "error",
    *,
    quality: int = 95,
) -> dict:
    """Extract the frames at `positions` of ``<videos_dir>/<item_id>.mp4`` for each item into the
    zip archive `out_zip` (members ``<item_id>_<k>.jpg``, k the index of the position; JPEG at
    `quality`), written atomically. A missing or undecodable video raises `VideoError` naming the
    item and file, or with ``missing="skip"`` is skipped and counted. Returns the manifest:
    positions, member pattern, counts (items, extracted, skipped, frames) and the skipped item
    ids with the reason for each."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'skip'")
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

    skipped: dict[str, str] = {}
    extracted = 0
    with atomic_path(out_zip, ".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for item in item_ids:
                path = videos_dir / f"{item}.mp4"
                try:
                    frames = extract_frames(path, positions)
                except VideoError as err:
                    if missing == "error":
                        raise VideoError(f"item {item!r}: {err} (set missing='skip' to skip and count such items)") from err
                    log.warning("skipping item %r: %s", item, err)
                    skipped[item] = str(err)
                    continue
                for k, image in enumerate(frames):
                    buf = io.BytesIO()
                    image.save(buf, format="JPEG", quality=quality)
                    zf.writestr(zipfile.ZipInfo(f"{item}_{k}.jpg", date_time=_ZIP_TIME), buf.getvalue())
                extracted += 1
    return {
        "positions": list(positions),
        "members": "<item_id>_<k>.jpg",
        "items": len(item_ids),
        "extracted": extracted,
        "skipped": len(skipped),
        "frames": extracted * len(positions),
        "skipped_items": list(skipped),
        "skip_reasons": skipped,
    }


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
            names = set(zf.namelist())
        if manifest.is_file() and len(names) != expected:
            raise ValueError(f"{len(names)} frames, but {manifest.name} beside it says {expected}")
        return names

    return read_or_set_aside(archive, read, then)
