"""Seconds per video of the frames rule (`iisan.data.frames`) on this machine's CPU, for videos the
size of MicroLens's: the rate `frames:` in src/iisan/rates.yaml records and the workflow sizes the
frames job from (`iisan.pipeline.budget.frames_minutes`).

For each codec (H.265 and H.264 by default) a synthetic video is encoded here with PyAV:
`--size` (width x height, default 1080x1920, portrait), `--fps`, `--clip-s` seconds long, at
`--mbit-s` (ABR; 4 Mbit/s is about 30 MB a minute), a textured background panning under a moving
square with some noise (libx265 preset ultrafast with SAO on, libx264 preset veryfast: CABAC,
B-frames and the deblocking filter, so that each frame costs about what a real one does to
decode; the encoder's speed is not measured). Then:

* ``extract``: what the rule does for one video (`iisan.data.frames._jpegs`: count the frames by
  demuxing, decode up to the last wanted frame on one decoder thread, three JPEGs at the rule's
  quality), `--repeats` times; the fastest, split into demux, decode and JPEG seconds (each
  timed on its own), and ``video_s``: those seconds for a video `--video-s` seconds long (demux
  and decode scale with the length, the JPEGs do not; pass ``--clip-s`` equal to ``--video-s``
  to measure a whole video instead of scaling a clip);
* ``workers``: `iisan.data.frames.extract_all` itself (thread pool, work-folder parts, archive) over
  `--videos` copies of the clip at each of `--workers` threads: wall seconds per clip and the
  speed-up over one thread; and again with every item reused from that archive, which is what
  writing an item into the archive costs (``assemble_item_s``).

The positions and JPEG quality are the workflow's (config/config.yaml ``captions.frames``; the
quality is `extract_all`'s default). One JSON line per measurement, and a last ``summary`` line
with the slower codec's ``video_s`` (what rates.yaml records).

    PYTHONPATH=src python benchmarks/frames_speed.py                       # about 1.5 min on 2 cores
    PYTHONPATH=src python benchmarks/frames_speed.py --clip-s 60 --codecs h264   # a whole minute

Needs av (PyAV with libx264/libx265 encoders), numpy, pillow and pyyaml.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import av
import numpy as np
import yaml

from iisan.data import frames
from iisan.data.folders import file_sha256

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = {"h265": ("libx265", {"preset": "ultrafast", "x265-params": "log-level=error:sao=1"}),
            "h264": ("libx264", {"preset": "veryfast"})}


def config_positions() -> list[float]:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    return list(config["captions"]["frames"])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def make_video(path: Path, codec: str, width: int, height: int, fps: int, seconds: float, mbit_s: float, seed: int = 0) -> dict:
    """Encode the synthetic clip (module docstring) into `path`; its frames, bytes and encode time."""
    name, options = ENCODERS[codec]
    rng = np.random.default_rng(seed)
    block = 8  # texture cells of 8 x 8 pixels, panned by a few pixels a frame
    cells = rng.integers(16, 240, (height // block + 40, width // block + 40), dtype=np.uint8)
    texture = np.kron(cells, np.ones((block, block), np.uint8))
    noise = rng.integers(0, 12, (height, width), dtype=np.uint8)
    chroma_cells = rng.integers(64, 192, (2, height // 2 // block + 20, width // 2 // block + 20), dtype=np.uint8)
    chroma = np.stack([np.kron(c, np.ones((block, block), np.uint8)) for c in chroma_cells])
    n = round(fps * seconds)
    t0 = time.perf_counter()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(name, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = int(mbit_s * 1e6)
        stream.options = dict(options)
        for i in range(n):
            dy, dx = (3 * i) % 160, (2 * i) % 160
            y = texture[dy:dy + height, dx:dx + width] + np.roll(noise, 7 * i, axis=1)
            side = height // 6
            top, left = (5 * i) % (height - side), (4 * i) % (width - side)
            y[top:top + side, left:left + side] = 235 - (i % 50)
            cy, cx = dy // 2, dx // 2
            u = chroma[0, cy:cy + height // 2, cx:cx + width // 2]
            v = chroma[1, cy:cy + height // 2, cx:cx + width // 2]
            planes = np.concatenate([y, u.reshape(-1, width), v.reshape(-1, width)])
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"frames": n, "bytes": path.stat().st_size, "encode_s": time.perf_counter() - t0}


def time_parts(video: Path, positions: list[float], quality: int) -> dict:
    """Seconds of one extraction as the rule does it, and of its demux and JPEG parts."""
    t0 = time.perf_counter()
    frames._jpegs(video, tuple(positions), quality)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames.count_frames(video)
    demux = time.perf_counter() - t0
    images = frames.extract_frames(video, positions, threads=1)
    t0 = time.perf_counter()
    jpeg_bytes = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        jpeg_bytes.append(len(buf.getvalue()))
    jpeg = time.perf_counter() - t0
    return {"total_s": total, "demux_s": demux, "jpeg_s": jpeg, "decode_s": max(total - demux - jpeg, 0.0),
            "jpeg_bytes": sum(jpeg_bytes)}


def time_workers(video: Path, workers: int, videos: int, positions: list[float], quality: int, tmp: Path) -> dict:
    """`extract_all` over `videos` copies (links) of `video` on `workers` threads, then again
    with everything reused from that archive."""
    folder = tmp / f"videos-{workers}"
    folder.mkdir()
    items = [f"v{i:04d}" for i in range(videos)]
    for item in items:
        os.link(video, folder / f"{item}.mp4")
    sha = file_sha256(video)
    shas = {f"{item}.mp4": sha for item in items}
    out = tmp / f"frames-{workers}.zip"
    t0 = time.perf_counter()
    manifest = frames.extract_all(items, folder, out, positions, quality=quality, video_sha256=shas, threads=workers)
    wall = time.perf_counter() - t0
    assert manifest["extracted"] == videos
    t0 = time.perf_counter()
    again = frames.extract_all(items, folder, out, positions, quality=quality, video_sha256=shas, previous=out, threads=workers)
    reuse = time.perf_counter() - t0
    assert again["reused"] == videos
    size = out.stat().st_size
    shutil.rmtree(folder)
    out.unlink()
    return {"wall_s": wall, "s_per_video": wall / videos, "assemble_item_s": reuse / videos, "archive_bytes_per_item": size / videos}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codecs", default="h265,h264", help="comma-separated: h265, h264")
    ap.add_argument("--size", default="1080x1920", help="width x height")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--mbit-s", type=float, default=4.0, help="target bitrate (4 Mbit/s: 30 MB a minute)")
    ap.add_argument("--clip-s", type=float, default=8.0, help="seconds of video encoded and timed")
    ap.add_argument("--video-s", type=float, default=60.0, help="length of the video video_s is given for")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="comma-separated thread counts of extract_all")
    ap.add_argument("--videos", type=int, default=4, help="clips per extract_all run (per thread count)")
    ap.add_argument("--positions", default=None, help="comma-separated; default: config/config.yaml captions.frames")
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--keep", type=Path, default=None, help="keep the generated clips in this folder")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    positions = [float(p) for p in args.positions.split(",")] if args.positions else config_positions()
    workers = [int(w) for w in args.workers.split(",") if w]
    scale = args.video_s / args.clip_s
    env = {"cpu": cpu_name(), "cores": cores(), "date": date.today().isoformat(), "pyav": av.__version__,
           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
           "ffmpeg": ".".join(map(str, av.library_versions["libavcodec"])) if hasattr(av, "library_versions") else None}
    print(json.dumps({"stage": "setup", **env, "size": f"{width}x{height}", "fps": args.fps, "mbit_s": args.mbit_s,
                      "clip_s": args.clip_s, "video_s_for": args.video_s, "positions": positions, "quality": args.quality}), flush=True)
    summary = {}
    with tempfile.TemporaryDirectory(prefix="frames-speed-") as tmp_:
        tmp = Path(tmp_)
        for codec in [c for c in args.codecs.split(",") if c]:
            video = (args.keep or tmp) / f"clip-{codec}-{width}x{height}-{args.clip_s:g}s.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            made = make_video(video, codec, width, height, args.fps, args.clip_s, args.mbit_s)
            print(json.dumps({"stage": "video", "codec": codec, "frames": made["frames"], "mb": round(made["bytes"] / 1e6, 2),
                              "mb_at_video_s": round(made["bytes"] * scale / 1e6, 1), "encode_s": round(made["encode_s"], 1)}), flush=True)
            frames._jpegs(video, tuple(positions), args.quality)  # warm: page cache, codec set-up
            runs = [time_parts(video, positions, args.quality) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["total_s"])
            video_s = (best["demux_s"] + best["decode_s"]) * scale + best["jpeg_s"]
            row = {"stage": "extract", "codec": codec, "clip_total_s": round(best["total_s"], 3),
                   "clip_median_s": round(statistics.median(r["total_s"] for r in runs), 3),
                   "demux_s": round(best["demux_s"], 3), "decode_s": round(best["decode_s"], 3), "jpeg_s": round(best["jpeg_s"], 3),
                   "decode_ms_per_frame": round(1000 * best["decode_s"] / (max(positions) * made["frames"]), 2),
                   "jpeg_kb_per_video": round(best["jpeg_bytes"] / 1e3), "video_s": round(video_s, 2),
                   "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
            print(json.dumps(row), flush=True)
            by_workers = {}
            for w in workers:
                r = time_workers(video, w, args.videos, positions, args.quality, tmp)
                by_workers[w] = r
                print(json.dumps({"stage": "workers", "codec": codec, "workers": w, "videos": args.videos,
                                  "clip_s_per_video": round(r["s_per_video"], 3),
                                  "speedup": round(by_workers[1]["s_per_video"] / r["s_per_video"], 2) if 1 in by_workers else None,
                                  "assemble_item_s": round(r["assemble_item_s"], 4),
                                  "archive_kb_per_item": round(r["archive_bytes_per_item"] / 1e3),
                                  "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)
            summary[codec] = {"video_s": round(video_s, 2), "mb": round(made["bytes"] * scale / 1e6, 1),
                              "assemble_item_s": round(min(r["assemble_item_s"] for r in by_workers.values()), 4) if by_workers else None}
    slowest = max(summary, key=lambda c: summary[c]["video_s"])
    print(json.dumps({"stage": "summary", **env, "size": f"{width}x{height}", "fps": args.fps, "seconds": args.video_s,
                      "mbit_s": args.mbit_s, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "codecs": summary,
                      "video_s": summary[slowest]["video_s"], "slowest": slowest}), flush=True)


if __name__ == "__main__":
    main()
