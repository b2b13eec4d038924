"""Caption shards: one dataset's captions of one source (covers or video frames) made by
`captions.shards` jobs instead of one.

Shard k of n (k = 1..n) holds the k-th of n contiguous ranges of the dataset's item ids in sorted
order (`shard_items`; the ranges' sizes differ by at most one), so a shard is a function of the
item set and n alone, never of the item table's row order. Each shard job captions its items into
``captions/<source>.shards/<k>-of-<n>.parquet`` with its own manifest (`iisan.captions`), and
`merge_captions` (a local job) writes the caption set at ``captions/<source>.parquet`` in the item
table's order with the manifest one job would write, plus ``shards: n``. With one shard the caption
job writes the caption set itself. All jobs of a caption set share its memo of captions keyed by
their images and settings (`iisan.captions.memo_dir`), so a failed or resharded job recaptions
only what no job has captioned yet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from . import plan


def caption_shards(config: dict) -> int:
    """The configured number of caption jobs per caption set (config key captions.shards, default 1)."""
    n = (config.get("captions") or {}).get("shards", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"config key captions.shards: {n!r} is not a positive whole number")
    return n


def shard_path(dataset: str, source: str, shard: int, shards: int) -> str:
    return plan.CAPTION_SHARD.format(dataset=dataset, source=source, shard=shard, shards=shards)


def caption_outputs(config: dict, dataset: str, source: str) -> list[str]:
    """The outputs of the caption jobs of one dataset and source: the caption set itself for one
    shard, else the n shard Parquets (merged by a local job into the caption set)."""
    n = caption_shards(config)
    if n == 1:
        return [plan.CAPTIONS.format(dataset=dataset, source=source)]
    return [shard_path(dataset, source, k, n) for k in range(1, n + 1)]


def shard_bounds(count: int, shard: int, shards: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` (1..shards) among `count` sorted items."""
    if not 1 <= shard <= shards:
        raise ValueError(f"shard {shard} of {shards}: expected 1 to {shards}")
    return (shard - 1) * count // shards, shard * count // shards


def shard_items(item_ids: Sequence, shard: int, shards: int) -> list:
    """The item ids of shard `shard` of `shards`, in the order of `item_ids`."""
    ordered = sorted(item_ids)
    start, stop = shard_bounds(len(ordered), shard, shards)
    mine = set(ordered[start:stop])
    return [i for i in item_ids if i in mine]


def merge_captions(item_ids: Sequence, shard_parquets: Sequence[str | os.PathLike], out_parquet: str | os.PathLike) -> dict:
    """Write the caption set `out_parquet` of `item_ids` (in that order) from its shards' Parquets,
    each checked against its manifest; every shard must hold exactly its items
    (`shard_items`, in the order of `shard_parquets`) under the same settings. Returns the
    manifest, which is the one a single job would write plus ``shards``; then prunes the caption
    set's memo to the shards' records."""
    import polars as pl

    from .cache_files import file_checksum
    from .captions import COLUMNS, CaptionError, CaptionMismatch, _differences, load_captions, manifest_path, memo_dir, prune_memo
    from .io import read_json, write_json, write_parquet

    out_parquet = Path(out_parquet)
    ids = [i.item() if hasattr(i, "item") else i for i in item_ids]
    n = len(shard_parquets)
    captions: dict = {}
    manifests = []
    for k, path in enumerate(shard_parquets, start=1):
        path = Path(path)
        frame = load_captions(path, {})
        m = read_json(manifest_path(path))
        if manifests and m["settings"] != manifests[0]["settings"]:
            differ = _differences(m["settings"], manifests[0]["settings"], set(m["settings"]) | set(manifests[0]["settings"]))
            raise CaptionMismatch(f"caption shard {path} was made under other settings than {shard_parquets[0]}: " + "; ".join(differ))
        want = shard_items(ids, k, n)
        got = frame["item_id"].to_list()
        if got != want:
            lost, extra = sorted(set(want) - set(got), key=str), sorted(set(got) - set(want), key=str)
            raise CaptionError(f"caption shard {path} ({k} of {n}) does not hold its items: missing {lost[:5]}, "
                               f"not its own {extra[:5]}; rerun it")
        captions.update(zip(got, frame["caption"].to_list()))
        manifests.append(m)
    manifest_file = manifest_path(out_parquet)
    manifest_file.unlink(missing_ok=True)  # a stale manifest must not vouch for the new Parquet
    write_parquet(pl.DataFrame({"item_id": ids, "caption": [captions[i] for i in ids]}), out_parquet)
    first = manifests[0]
    manifest = {
        "settings": first["settings"],
        "items": len(ids),
        "columns": list(COLUMNS),
        "truncated": sum(m["truncated"] for m in manifests),
        "empty": sum(m["empty"] for m in manifests),
        "batch_size": first["batch_size"],
        "device": first["device"] if len({m["device"] for m in manifests}) == 1 else sorted({m["device"] for m in manifests}),
        "library_version": first["library_version"],
        "bytes": out_parquet.stat().st_size,
        "checksum": file_checksum(out_parquet),
        "shards": n,
    }
    write_json(manifest_file, manifest)
    prune_memo(memo_dir(out_parquet), first["settings"], [Path(p).stem for p in shard_parquets])
    return manifest
