"""Captioning a preprocessed dataset (`caption_dataset`: its covers, or its videos' frames, from
the zip archives the workflow makes) and merging a caption set's shards (`merge_captions`)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iisan.captions.files import (
    CaptionError,
    CaptionMismatch,
    differences,
    images_sha256,
    load_captions,
    manifest_path,
    memo_dir,
    plain_id,
    prune_memo,
    write_caption_set,
)
from iisan.captions.llava import caption_items
from iisan.captions.settings import CaptionJob, load_prompts
from iisan.io import read_json


def _zip_images(archive: Path, members: list[str | None], blank: int = 32, item=None, dataset: str | None = None,
                advice: str | None = None) -> list:
    """RGB images of zip `members` (item `item`'s) at their own size (a black square for None);
    one that does not decode raises `iisan.data.images.UndecodableImage` naming the archive, the
    member, the item and `advice` (by default the config key that blanks a cover)."""
    from PIL import Image

    from iisan.data.images import open_image

    with zipfile.ZipFile(archive) as zf:
        out = []
        for m in members:
            if m is None:
                out.append(Image.new("RGB", (blank, blank)))
            else:
                out.append(open_image(zf, m, archive, item, dataset, advice))
        return out


def zip_images_sha256(archive: Path, members: dict[Any, list[str | None]]) -> dict[Any, str]:
    """{item: `images_sha256` of the sha256s of its zip members' bytes ("black" for None)}, the
    archive opened once."""
    with zipfile.ZipFile(archive) as zf:
        return {item: images_sha256("black" if m is None else hashlib.sha256(zf.read(m)).hexdigest() for m in names)
                for item, names in members.items()}


def caption_dataset(job: CaptionJob, items_parquet: Path, images_archive: Path, prompts_file: Path, out_parquet: Path, *,
                    device: str | None = None) -> dict:
    """Caption every item of a preprocessed dataset (`job`: what, how and which shard): source
    "cover" reads each item's cover from the dataset's image archive (items.parquet's `image`
    member; an item without one gets a black image), "video" its frames from the frames archive
    (``<item_id>_<k>.jpg``, k over the settings' `frames`; an item whose video was skipped gets
    black frames). The prompt is the source's entry of `prompts_file`; the caption set's settings
    record the source and the frame positions. A shard job captions its shard of the items
    (`iisan.captions.shards.shard_items`) into the memo of the whole caption set (`caption_items`).
    Captions are reused by the sha256 of the members' bytes."""
    import polars as pl

    from iisan.captions.shards import shard_items

    source, options = job.source, job.settings
    positions = options.frames
    prompt = load_prompts(prompts_file)[source]
    items = pl.read_parquet(items_parquet)
    ids = shard_items([plain_id(i) for i in items["item_id"].to_list()], *job.shard)
    if source == "cover":
        covers = dict(zip(items["item_id"].to_list(), items["image"].to_list()))
        members = {i: [covers[i]] for i in ids}
    elif source == "video":
        from iisan.data.frames import read_frames

        present = read_frames(images_archive)
        n = len(positions)
        if n != prompt["images"]:
            raise ValueError(f"{prompts_file}: the video prompt has {prompt['images']} image slots, the frames are {n} per video")
        members = {i: [m if m in present else None for m in (f"{i}_{k}.jpg" for k in range(n))] for i in ids}

    # the dataset's folder (resources/<dataset>) is named after its dataset_sources entry
    dataset = Path(items_parquet).parent.name
    advice = None if source == "cover" else (f"{images_archive} is the frames job's output: move it aside and rerun the "
                                              "workflow to extract the frames again")

    def images_for(item_id):
        return _zip_images(images_archive, members[item_id], item=item_id, dataset=dataset, advice=advice)

    keys = zip_images_sha256(images_archive, members)
    settings = {"source": source, "frame_positions": list(positions) if source == "video" else None}
    return caption_items(job.captioner, ids, images_for, prompt["text"], out_parquet, batch_size=options.batch_size,
                         max_new_tokens=options.max_new_tokens, device=device, settings=settings, revision=job.revision,
                         kv_cache=options.kv_cache, attention=options.attention, workers=options.workers, image_key=keys.__getitem__,
                         memo=memo_dir(job.caption_set) if job.sharded else None)


def merge_captions(item_ids: Sequence, shard_parquets: Sequence[str | os.PathLike], out_parquet: str | os.PathLike) -> dict:
    """Write the caption set `out_parquet` of `item_ids` (in that order) from its shards' Parquets,
    each checked against its manifest; every shard must hold exactly its items
    (`iisan.captions.shards.shard_items`, in the order of `shard_parquets`) under the same settings. Returns the
    manifest, which is the one a single job would write plus ``shards``; then prunes the caption
    set's memo to the shards' records."""
    from iisan.captions.shards import shard_items

    out_parquet = Path(out_parquet)
    ids = [plain_id(i) for i in item_ids]
    n = len(shard_parquets)
    captions: dict = {}
    manifests = []
    for k, path in enumerate(shard_parquets, start=1):
        path = Path(path)
        frame = load_captions(path, {})
        m = read_json(manifest_path(path))
        if manifests and m["settings"] != manifests[0]["settings"]:
            differ = differences(m["settings"], manifests[0]["settings"], set(m["settings"]) | set(manifests[0]["settings"]))
            raise CaptionMismatch(f"caption shard {path} was made under other settings than {shard_parquets[0]}: " + "; ".join(differ))
        want = shard_items(ids, k, n)
        got = frame["item_id"].to_list()
        if got != want:
            lost, extra = sorted(set(want) - set(got), key=str), sorted(set(got) - set(want), key=str)
            raise CaptionError(f"caption shard {path} ({k} of {n}) does not hold its items: missing {lost[:5]}, "
                               f"not its own {extra[:5]}; rerun it")
        captions.update(zip(got, frame["caption"].to_list()))
        manifests.append(m)
    first = manifests[0]
    devices = sorted({m["device"] for m in manifests})
    manifest = write_caption_set(
        out_parquet, ids, [captions[i] for i in ids], settings=first["settings"], truncated=sum(m["truncated"] for m in manifests),
        empty=sum(m["empty"] for m in manifests), batch_size=first["batch_size"], device=devices[0] if len(devices) == 1 else devices,
        library_version=first["library_version"], shards=n,
    )
    prune_memo(memo_dir(out_parquet), first["settings"], [Path(p).stem for p in shard_parquets])
    return manifest
