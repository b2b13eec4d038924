"""A generated demo dataset with a planted, learnable structure.

Items belong to groups (and sub-groups). A title mixes group words, sub-group words and common
words; a cover image's colour follows the group and its shape the sub-group. A user's sequence
mostly stays in a group or moves to the next group, and picks items by a within-group Zipf
popularity, so a sequential model that reads titles or images clearly beats popularity ranking.

The files are written in the layout of the authors' published data (items TSV, users TSV,
a zip archive of ``<item_id>.jpg``), so the demo runs through the same preprocessing.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from iisan.io import atomic_path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "fe", "hi", "jo", "be"]
_SHAPES = ("square", "circle", "triangle", "bar")


@dataclass
class DemoSpec:
    """The generator's settings: the size, the planted groups and sub-groups, the covers' size
    and the sequences' lengths and moves (`planted_sequences`). The MicroLens twin's spec
    (iisan.data.microlens_demo.MicroLensDemoSpec) extends it."""

    n_items: int = 1200
    n_users: int = 2000
    n_groups: int = 8
    n_subgroups: int = 4
    seed: int = 7
    image_size: int = 32
    min_len: int = 3
    max_len: int = 16
    p_stay: float = 0.6
    p_next_group: float = 0.3
    zipf: float = 1.1


def _words(rng: np.random.Generator, n: int, length: int = 3) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES, size=length)))
    return sorted(out)


def _image(rng: np.random.Generator, size: int, group: int, n_groups: int, sub: int) -> Image.Image:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(group / n_groups, 0.85, 0.95)
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    fg = (int(r * 255), int(g * 255), int(b * 255))
    m = size // 6 + int(rng.integers(0, max(1, size // 10)))
    box = (m, m, size - m, size - m)
    shape = _SHAPES[sub % len(_SHAPES)]
    if shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=fg)
    else:
        draw.rectangle((m, size // 3, size - m, 2 * size // 3), fill=fg)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def planted_sequences(rng: np.random.Generator, group: np.ndarray, sub: np.ndarray, G: int, spec) -> list[list[int]]:
    """`spec.n_users` item sequences (indices into `group`) following the planted structure: a
    random first group; then the same sub-group with probability `p_stay`, the next group with
    `p_next_group`, else a random group; items within a group by a Zipf popularity (`zipf`) over
    a random ranking. Shared by both demo generators (`spec`: n_users, min_len, max_len, p_stay,
    p_next_group, zipf); `G` groups."""
    members = [np.flatnonzero(group == g) for g in range(G)]
    weights = []
    for g in range(G):
        ranks = rng.permutation(len(members[g])) + 1
        w = ranks.astype(float) ** -spec.zipf
        weights.append(w / w.sum())

    def pick(g: int, s: int | None = None) -> int:
        cand, w = members[g], weights[g]
        if s is not None:
            keep = sub[cand] == s
            if keep.any():
                cand, w = cand[keep], w[keep] / w[keep].sum()
        return int(rng.choice(cand, p=w))

    seqs = []
    for _ in range(spec.n_users):
        length = int(rng.integers(spec.min_len, spec.max_len + 1))
        item = pick(int(rng.integers(0, G)))
        seq = [item]
        for _ in range(length - 1):
            r = rng.random()
            if r < spec.p_stay:
                item = pick(int(group[item]), int(sub[item]))
            elif r < spec.p_stay + spec.p_next_group:
                item = pick((int(group[item]) + 1) % G)
            else:
                item = pick(int(rng.integers(0, G)))
            seq.append(item)
        seqs.append(seq)
    return seqs


def generate(out_dir: Path, spec: DemoSpec | None = None) -> dict[str, Path]:
    """Write items.tsv, users.tsv and images.zip into `out_dir`; return their paths."""
    spec = spec or DemoSpec()
    rng = np.random.default_rng(spec.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    G, SG = spec.n_groups, spec.n_subgroups

    group_words = [_words(rng, 6) for _ in range(G)]
    sub_words = [[_words(rng, 3, 2) for _ in range(SG)] for _ in range(G)]
    common = _words(rng, 40, 2)

    group = rng.integers(0, G, size=spec.n_items)
    sub = rng.integers(0, SG, size=spec.n_items)
    item_ids = [f"D{n:05d}" for n in range(spec.n_items)]
    titles = []
    for n in range(spec.n_items):
        g, s = group[n], sub[n]
        words = list(rng.choice(group_words[g], size=2, replace=False))
        words += list(rng.choice(sub_words[g][s], size=1))
        words += list(rng.choice(common, size=int(rng.integers(1, 4))))
        rng.shuffle(words)
        titles.append(" ".join(words) + f" {int(rng.integers(1, 100))}")

    users = [(f"U{u:06d}", seq) for u, seq in enumerate(planted_sequences(rng, group, sub, G, spec))]

    paths = {"items": out_dir / "items.tsv", "users": out_dir / "users.tsv", "images": out_dir / "images.zip"}
    with atomic_path(paths["items"]) as tmp:
        tmp.write_text("".join(f"{i}\t{t}\n" for i, t in zip(item_ids, titles)), encoding="utf-8")
    with atomic_path(paths["users"]) as tmp:
        tmp.write_text(
            "".join(f"{u}\t{' '.join(item_ids[i] for i in seq)}\n" for u, seq in users), encoding="utf-8"
        )
    with atomic_path(paths["images"], ".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for n, iid in enumerate(item_ids):
                buf = io.BytesIO()
                _image(rng, spec.image_size, int(group[n]), G, int(sub[n])).save(buf, format="JPEG", quality=90)
                # a fixed timestamp: the same seed gives the same archive, byte for byte
                zf.writestr(zipfile.ZipInfo(f"{iid}.jpg", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    return paths


def images(dataset: str, source: dict) -> str:
    """Where the workflow keeps the generated cover archive (the demo dataset kind, iisan.data.kinds)."""
    from iisan.data.paths import RAW_IMAGES

    return RAW_IMAGES.format(dataset=dataset)
