"""Caption shards: one dataset's captions of one source (covers or video frames) made by
`captions.shards` jobs instead of one.

Shard k of n (k = 1..n) holds the k-th of n contiguous ranges of the dataset's item ids in sorted
order (`shard_items`; the ranges' sizes differ by at most one), so a shard is a function of the
item set and n alone, never of the item table's row order. Each shard job captions its items into
``captions/<source>.shards/<k>-of-<n>.parquet`` with its own manifest (`iisan.captions`), and
`iisan.captions.merge_captions` (a local job) writes the caption set at
``captions/<source>.parquet`` in the item table's order with the manifest one job would write, plus ``shards: n``. With one shard the caption
job writes the caption set itself. All jobs of a caption set share its memo of captions keyed by
their images and settings (`iisan.captions.memo_dir`), so a failed or resharded job recaptions
only what no job has captioned yet.
"""

from __future__ import annotations

from collections.abc import Sequence

from iisan.pipeline import plan


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
