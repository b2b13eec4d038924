"""A generated MicroLens-100k twin: the demo dataset's planted structure in MicroLens's file formats.

`generate` writes, into one folder, exactly the files of the published benchmark (see microlens.py):

* ``MicroLens-100k_pairs.tsv``: ``user_id \\t item item ...`` (oldest first, single spaces);
* ``MicroLens-100k_title_en.csv``: no header, ``item_id,title`` with the title everything after
  the first comma; some titles contain commas, a few are wrapped in double quotes (kept literally);
* ``covers.zip``: members ``MicroLens-100k_covers/<item_id>.jpg`` (the workflow keeps covers in a
  zip archive, matched by file stem);
* ``MicroLens-100k_videos/<item_id>.mp4``: short H.265 videos (see below).

Item ids are integers written as strings, drawn without replacement from 1..20*n_items and
listed in random (unsorted) order, so that item-file order, numeric order and string order all
differ. User ids are 1..n_users. The structure is the one of demo.py: items belong to groups and
sub-groups; a title mixes group, sub-group and common words; a cover's colour follows the group
and its shape the sub-group; a user's sequence mostly stays in the sub-group, or moves to the
next group, with a within-group Zipf popularity. A video shows the item's group colour in its
sub-group's shape MOVING from one corner of the frame towards the opposite one (plus a neutral
grey band sweeping the background), so frames at 10 %, 50 % and 90 % of a video differ while each
carries the group: `frame_group` recovers it from the dominant hue. `plan(spec)` gives the
planted truth (item -> group, sub-group) without writing anything.

Videos are H.265 (libx265; `VideoSpec.codec="auto"` takes H.264 where the PyAV build has no
libx265, `hevc_support()` says which). A fixed seed gives byte-identical files for one PyAV build,
MP4s included: the container carries no wall-clock time (``fflags=+bitexact``, x265 ``info=0``),
x265 runs single-threaded with 16x16 coding-tree units, and `VideoSpec` sizes are multiples of 16
of at least 32 (docs/notes.md: why).
"""

from __future__ import annotations

import colorsys
import io
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from iisan.data.demo import _SHAPES, DemoSpec, _image, _words, planted_sequences
from iisan.data.microlens import COVERS, COVERS_DIR, PAIRS, PUBLISHED, TITLES, VIDEOS  # the published names
from iisan.io import atomic_path, current_umask

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp: the same seed gives the same archive


@dataclass
class VideoSpec:
    size: int = 32  # width = height; a multiple of 16, at least 32 (see the module docstring)
    min_frames: int = 24
    max_frames: int = 40
    fps: int = 8
    codec: str = "auto"  # auto (H.265 if the PyAV build can encode it, else H.264) | hevc | h264
    keyint: int = 16  # a keyframe every `keyint` frames, so that videos have several GOPs
    crf: int = 28


@dataclass
class MicroLensDemoSpec(DemoSpec):
    """The demo's planted structure (`DemoSpec`'s fields, fewer items and users by default), plus
    MicroLens's title quirks and videos."""

    n_items: int = 300  # DemoSpec's field, this default
    n_users: int = 400  # DemoSpec's field, this default
    p_comma: float = 0.3  # titles with a comma (", " between two of their words)
    p_quoted: float = 0.05  # titles wrapped in double quotes, with a comma inside
    video: VideoSpec = field(default_factory=VideoSpec)


@dataclass
class Plan:
    """The planted truth: items in titles-file order with their group and sub-group, and users."""

    item_ids: list[str]
    titles: list[str]
    group: np.ndarray
    sub: np.ndarray
    users: list[tuple[str, list[int]]]  # (user id, item indices into item_ids), oldest first

    def groups(self) -> dict[str, tuple[int, int]]:
        return {i: (int(g), int(s)) for i, g, s in zip(self.item_ids, self.group, self.sub)}


def _spec(spec: MicroLensDemoSpec | dict | None) -> MicroLensDemoSpec:
    """A spec from None (the defaults), a spec, or a dict (as a config gives; 'video' a dict)."""
    if spec is None:
        return MicroLensDemoSpec()
    if isinstance(spec, MicroLensDemoSpec):
        out = spec
    else:
        spec = dict(spec)
        video = spec.pop("video", None)
        out = MicroLensDemoSpec(**spec, video=VideoSpec(**(video or {})))
    v = out.video
    if v.size < 32 or v.size % 16:
        raise ValueError(f"video size {v.size}: must be a multiple of 16 and at least 32 (x265 needs frames of 2x2 CTUs)")
    if v.codec not in ("auto", "hevc", "h264"):
        raise ValueError(f"video codec {v.codec!r}: expected auto, hevc or h264")
    if not 1 <= v.min_frames <= v.max_frames:
        raise ValueError(f"video frames: need 1 <= min_frames ({v.min_frames}) <= max_frames ({v.max_frames})")
    if out.n_items > 0 and out.n_groups > out.n_items:
        raise ValueError(f"{out.n_groups} groups for {out.n_items} items")
    return out


def plan(spec: MicroLensDemoSpec | dict | None = None) -> Plan:
    """Items, titles, groups and user sequences for `spec` (what `generate` writes)."""
    spec = _spec(spec)
    rng = np.random.default_rng([spec.seed, 0])
    G, SG = spec.n_groups, spec.n_subgroups

    group_words = [_words(rng, 6) for _ in range(G)]
    sub_words = [[_words(rng, 3, 2) for _ in range(SG)] for _ in range(G)]
    common = _words(rng, 40, 2)

    group = rng.integers(0, G, size=spec.n_items)
    group[:G] = np.arange(G)  # every group has an item
    sub = rng.integers(0, SG, size=spec.n_items)
    ids = rng.choice(np.arange(1, 20 * spec.n_items + 1), size=spec.n_items, replace=False)
    item_ids = [str(int(i)) for i in ids]
    titles = []
    for n in range(spec.n_items):
        g, s = group[n], sub[n]
        words = list(rng.choice(group_words[g], size=2, replace=False))
        words += list(rng.choice(sub_words[g][s], size=1))
        words += list(rng.choice(common, size=int(rng.integers(1, 4))))
        rng.shuffle(words)
        words.append(str(int(rng.integers(1, 100))))
        r = rng.random()
        if r < spec.p_comma + spec.p_quoted:  # a comma after one of the first words
            k = int(rng.integers(0, len(words) - 1))
            words[k] += ","
        title = " ".join(words)
        if r < spec.p_quoted:
            title = f'"{title}"'
        titles.append(title)

    users = [(str(u + 1), seq) for u, seq in enumerate(planted_sequences(rng, group, sub, G, spec))]
    return Plan(item_ids, titles, group, sub, users)


# --- videos -----------------------------------------------------------------------------------


def group_colour(group: int, n_groups: int) -> tuple[int, int, int]:
    """The RGB colour of a group (the covers' colour of demo.py)."""
    r, g, b = colorsys.hsv_to_rgb(group / n_groups, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def frame_group(image: Image.Image, n_groups: int, min_saturation: float = 0.4) -> int | None:
    """The planted group of a video frame or cover: the group whose hue is nearest the median hue
    of the saturated pixels (the background and the sweeping band are grey). None without any."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=float) / 255.0
    hue, sat = hsv[..., 0], hsv[..., 1]
    hues = hue[sat >= min_saturation]
    if hues.size == 0:
        return None
    # circular median: rotate so that the largest gap between observed hues is at the wrap
    angles = np.sort(hues)
    gaps = np.diff(np.concatenate([angles, angles[:1] + 1.0]))
    start = angles[(int(np.argmax(gaps)) + 1) % len(angles)]
    centre = (np.median((hues - start) % 1.0) + start) % 1.0
    dist = np.abs((centre - np.arange(n_groups) / n_groups + 0.5) % 1.0 - 0.5)
    return int(np.argmin(dist))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:  # bar
        h = (y1 - y0) // 3
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)


def video_frames(rng: np.random.Generator, video: VideoSpec, group: int, n_groups: int, sub: int) -> list[Image.Image]:
    """The frames of one item's video: its group colour in its sub-group's shape, moving in a
    straight line from near one corner to near the opposite one, on a light grey background
    swept by a darker grey band."""
    size = video.size
    n = int(rng.integers(video.min_frames, video.max_frames + 1))
    grey = int(rng.integers(190, 236))
    band_grey = grey - int(rng.integers(50, 90))
    fg = group_colour(group, n_groups)
    box = max(8, int(size * 0.42))
    span = size - box
    jitter = max(1, size // 10)
    corner = int(rng.integers(0, 4))
    start = np.array([corner % 2, corner // 2], dtype=float) * span
    end = span - start
    start += np.where(start == 0, 1, -1) * rng.integers(0, jitter, size=2)
    end += np.where(end == 0, 1, -1) * rng.integers(0, jitter, size=2)
    band = max(3, size // 5)
    band_speed = float(rng.uniform(0.5, 1.5)) * (1 if rng.random() < 0.5 else -1)
    shape = _SHAPES[sub % len(_SHAPES)]
    frames = []
    for t in range(n):
        f = t / max(1, n - 1)
        img = Image.new("RGB", (size, size), (grey,) * 3)
        draw = ImageDraw.Draw(img)
        bx = int(round((f * band_speed % 1.0) * (size + band))) - band
        draw.rectangle((bx, 0, bx + band - 1, size - 1), fill=(band_grey,) * 3)
        x, y = (start + f * (end - start)).round().astype(int)
        _draw_shape(draw, shape, (int(x), int(y), int(x) + box - 1, int(y) + box - 1), fg)
        frames.append(img)
    return frames


def _encoder(codec: str) -> str:
    """The FFmpeg encoder for VideoSpec.codec: libx265 or libx264."""
    import av

    if codec in ("auto", "hevc"):
        try:
            av.codec.Codec("libx265", "w")
            return "libx265"
        except av.codec.codec.UnknownCodecError:
            if codec == "hevc":
                raise
    return "libx264"


def _encoder_options(encoder: str, video: VideoSpec) -> dict[str, str]:
    if encoder == "libx265":
        params = f"log-level=error:info=0:pools=none:frame-threads=1:ctu=16:keyint={video.keyint}:min-keyint={video.keyint}"
        return {"preset": "ultrafast", "crf": str(video.crf), "x265-params": params}
    params = f"threads=1:lookahead-threads=1:keyint={video.keyint}:min-keyint={video.keyint}"
    return {"preset": "ultrafast", "crf": str(video.crf), "x264-params": params}


def write_video(path: Path, frames: list[Image.Image], video: VideoSpec, encoder: str | None = None) -> None:
    """Encode `frames` (RGB, all one size) as an MP4 at `video.fps`, reproducibly (see the module
    docstring). Written to `path` directly: callers write into a temporary folder."""
    import av

    encoder = encoder or _encoder(video.codec)
    with av.open(str(path), "w", format="mp4", container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(encoder, rate=video.fps, options=_encoder_options(encoder, video))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        rate = Fraction(1, video.fps)  # the frames' time base (the muxer picks the stream's own)
        for t, img in enumerate(frames):
            frame = av.VideoFrame.from_image(img)
            frame.pts = t
            frame.time_base = rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def hevc_support() -> dict[str, bool]:
    """Whether this PyAV build can encode and decode H.265, checked by a round trip of 8 frames."""
    import av

    out = {}
    for key, name, mode in [("decoder", "hevc", "r"), ("encoder", "libx265", "w")]:
        try:
            av.codec.Codec(name, mode)
            out[key] = True
        except av.codec.codec.UnknownCodecError:
            out[key] = False
    out["round_trip"] = False
    if out["encoder"] and out["decoder"]:
        video = VideoSpec(size=32, min_frames=8, max_frames=8)
        frames = [Image.new("RGB", (32, 32), group_colour(g % 8, 8)) for g in range(8)]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "check.mp4"
            write_video(path, frames, video, "libx265")
            with av.open(str(path)) as c:
                decoded = [f.to_image() for f in c.decode(video=0)]
                name = c.streams.video[0].codec_context.name
        out["round_trip"] = name == "hevc" and [frame_group(f, 8) for f in decoded] == list(range(8))
    return out


# --- writing ----------------------------------------------------------------------------------


def generate(out_dir: Path, spec: MicroLensDemoSpec | dict | None = None) -> dict[str, Path]:
    """Write the MicroLens-format demo into `out_dir`; return the paths (keys: pairs, titles,
    covers, videos). Every file is written atomically; the videos folder is built beside its
    target and renamed into place (replacing an older one)."""
    spec = _spec(spec)
    encoder = _encoder(spec.video.codec)
    p = plan(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"pairs": out_dir / PAIRS, "titles": out_dir / TITLES, "covers": out_dir / COVERS, "videos": out_dir / VIDEOS}
    G = spec.n_groups

    with atomic_path(paths["titles"], ".csv") as tmp:
        tmp.write_bytes("".join(f"{i},{t}\n" for i, t in zip(p.item_ids, p.titles)).encode("utf-8"))
    with atomic_path(paths["pairs"], ".tsv") as tmp:
        tmp.write_bytes("".join(f"{u}\t{' '.join(p.item_ids[i] for i in seq)}\n" for u, seq in p.users).encode("utf-8"))

    rng = np.random.default_rng([spec.seed, 1])
    with atomic_path(paths["covers"], ".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for n, iid in enumerate(p.item_ids):
                buf = io.BytesIO()
                _image(rng, spec.image_size, int(p.group[n]), G, int(p.sub[n])).save(buf, format="JPEG", quality=90)
                zf.writestr(zipfile.ZipInfo(f"{COVERS_DIR}/{iid}.jpg", date_time=_ZIP_TIME), buf.getvalue())

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{VIDEOS}.", dir=out_dir))
    try:
        for n, iid in enumerate(p.item_ids):
            rng = np.random.default_rng([spec.seed, 2, n])  # one stream per video
            frames = video_frames(rng, spec.video, int(p.group[n]), G, int(p.sub[n]))
            write_video(tmp_dir / f"{iid}.mp4", frames, spec.video, encoder)
            os.chmod(tmp_dir / f"{iid}.mp4", 0o666 & ~current_umask())
        os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp creates 0700
        if paths["videos"].exists():
            shutil.rmtree(paths["videos"])
        os.replace(tmp_dir, paths["videos"])
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return paths


def twin(tmp: Path, source: dict, mirror: Path) -> dict[str, str | int]:
    """The rehearsal's twin of MicroLens-100k (`iisan.pipeline.rehearsal.build_mirror`): the pairs TSV,
    titles CSV, covers zip and H.265 videos of `iisan.data.generate` with the
    entry's ``microlens_demo`` settings, each that the entry names (the videos: their count)."""
    from iisan.data.twins import file_sha256, place

    raw = generate(tmp, source.get("microlens_demo"))
    files: dict[str, str | int] = {}
    for key in PUBLISHED:
        if source.get(key):
            files[source[key]] = file_sha256(place(raw[key], mirror, source[key]))
    if source.get("videos"):
        videos = place(raw["videos"], mirror, source["videos"])
        files[source["videos"]] = sum(1 for _ in videos.glob("*.mp4"))
    return files
