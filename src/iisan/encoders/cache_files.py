"""The files of a backbone cache and the checks that decide whether to trust them, without
torch (the workflow runs them before its job graph is built): the array's and manifest's names,
the manifest's seal (`manifest_checksum`, xxh3-128 of every other field), `read_manifest`,
`check_array`, and moving a damaged cache aside (`set_cache_aside`, `set_aside_damaged`,
`verify_cache`). Building and loading caches: `iisan.encoders.cache`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xxhash

from iisan.io import set_aside, write_json

ARRAY = "cache.npy"
MANIFEST = "manifest.json"


CHECKSUM = "xxh3_128"  # 2.3-2.8 GiB/s from the page cache on one core: a 26 GB cache in ~10 s (docs/benchmarks.md)


class CacheError(ValueError):
    """A cache that cannot be used as it is: damaged, incomplete or inconsistent (the message
    names the file and the field)."""


class CacheMismatch(CacheError):
    """A sound cache of something other than what the experiment asks for."""


# every manifest field a reader relies on, with its JSON type
MANIFEST_FIELDS = {
    "backbone": str, "source": str, "family": str, "modality": str, "field": str, "pooling": str,
    "compute_dtype": str, "dtype": str, "num_layers": int, "output_layer": int, "stored_layers": list, "hidden": int,
    "items": int, "item_order_hash": str, "shape": list, "bytes": int, "checksum": str, "settings": dict,
    "manifest_checksum": str,
}
SEAL = "manifest_checksum"


def file_chunks(path: Path, chunk: int = 1 << 24):
    """A file's bytes in `chunk`-sized views of one reused buffer (no copy per chunk)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            yield view[:n]


def file_checksum(path: Path) -> str:
    """``xxh3_128:<hex>`` of a file's bytes."""
    h = xxhash.xxh3_128()
    for block in file_chunks(path):
        h.update(block)
    return f"{CHECKSUM}:{h.hexdigest()}"


def manifest_seal(m: dict) -> str:
    """``xxh3_128:<hex>`` of every field of manifest `m` but `manifest_checksum` (canonical JSON)."""
    body = json.dumps({k: v for k, v in m.items() if k != SEAL}, sort_keys=True, separators=(",", ":"))
    return f"{CHECKSUM}:{xxhash.xxh3_128(body.encode()).hexdigest()}"


def write_manifest(cache_dir: Path, manifest: dict) -> dict:
    """Write `manifest` (sealed with `manifest_checksum`) into `cache_dir`; returns it as written."""
    m = json.loads(json.dumps({k: v for k, v in manifest.items() if k != SEAL}))  # as it reads back
    m[SEAL] = manifest_seal(m)
    write_json(Path(cache_dir) / MANIFEST, m)
    return m


def read_manifest(cache_dir: Path) -> dict:
    """Parse and check a cache manifest on its own: JSON, every field present with its type,
    `manifest_checksum` equal to the checksum of the other fields, stored layers strictly
    increasing within h[0..L], shape = (items + 1, stored layers, hidden)."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path}: no manifest")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(m, dict):
        raise CacheError(f"{path}: expected a JSON object, found {type(m).__name__}")
    for key, kind in MANIFEST_FIELDS.items():
        if key not in m:
            raise CacheError(f"{path}: field {key!r} is missing (an incomplete manifest)")
        if not isinstance(m[key], kind) or (kind is int and isinstance(m[key], bool)):
            raise CacheError(f"{path}: field {key!r} is {m[key]!r}, expected a JSON {kind.__name__}")
    if m[SEAL] != manifest_seal(m):
        raise CacheError(f"{path}: its fields do not match field {SEAL!r} (the manifest was edited or damaged after it was written)")
    if m["output_layer"] not in (m["num_layers"], m["num_layers"] + 1):
        raise CacheError(f"{path}: field 'output_layer' is {m['output_layer']}, expected {m['num_layers']} (h[L]) "
                         f"or {m['num_layers'] + 1} (the output after a final norm)")
    layers = m["stored_layers"]
    if not layers or any(not isinstance(l, int) for l in layers) or layers != sorted(set(layers)) \
            or layers[0] < 0 or layers[-1] > m["output_layer"]:
        raise CacheError(f"{path}: field 'stored_layers' is {layers}, expected strictly increasing "
                         f"indices into h[0..{m['output_layer']}]")
    expected = [m["items"] + 1, len(layers), m["hidden"]]
    if m["shape"] != expected:
        raise CacheError(f"{path}: field 'shape' is {m['shape']}, but items + 1, stored_layers and hidden give {expected}")
    return m


def check_array(cache_dir: Path, m: dict, *, checksum: bool = False) -> None:
    """The array against its manifest: present, the size in bytes, the .npy header's shape and
    dtype, and (when `checksum`) the content checksum, which reads the whole file."""
    path = Path(cache_dir) / ARRAY
    where = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path}: missing ({where} describes it); rerun the workflow to rebuild it")
    size = path.stat().st_size
    if size != m["bytes"]:
        raise CacheError(f"{path}: {size} bytes, but field 'bytes' of {where} says {m['bytes']} (truncated or replaced)")
    try:
        with open(path, "rb") as fh:
            shape, _, dtype = _npy_header(fh)
    except ValueError as err:
        raise CacheError(f"{path}: not a readable .npy array ({err})") from None
    if list(shape) != m["shape"]:
        raise CacheError(f"{path}: array shape {list(shape)}, but field 'shape' of {where} says {m['shape']}")
    if np.dtype(dtype) != np.dtype(m["dtype"]):
        raise CacheError(f"{path}: array dtype {np.dtype(dtype).name}, but field 'dtype' of {where} says {m['dtype']}")
    if checksum:
        actual = file_checksum(path)
        if actual != m["checksum"]:
            raise CacheError(f"{path}: content checksum {actual}, but field 'checksum' of {where} says {m['checksum']} "
                             "(the array was damaged after it was written)")


def set_cache_aside(cache_dir: Path, reason: str) -> list[Path]:
    """Move a cache's array and manifest aside (``<name>.damaged-<time>``; nothing is deleted) so
    that the workflow rebuilds the cache; returns their new paths."""
    return [set_aside(f, reason) for f in (Path(cache_dir) / ARRAY, Path(cache_dir) / MANIFEST) if f.is_file()]


def damaged_caches(root: Path) -> list[tuple[Path, str]]:
    """(folder, what is wrong) of every cache under `root` whose manifest is invalid, incomplete or
    edited, or whose array's size or .npy header disagrees with its manifest, checked without
    reading whole arrays (the checksum is compared by the jobs that load an array). Only reads."""
    out = []
    for manifest in sorted(Path(root).rglob(MANIFEST)):
        folder = manifest.parent
        try:
            m = read_manifest(folder)
            if (folder / ARRAY).exists():
                check_array(folder, m)
        except CacheError as err:
            out.append((folder, str(err)))
    return out


def set_aside_damaged(root: Path) -> list[Path]:
    """Move every damaged cache under `root` (`damaged_caches`) aside, so that a job needing it
    rebuilds it (the workflow does this while it builds a run's job graph); returns the folders."""
    damaged = damaged_caches(root)
    for folder, why in damaged:
        set_cache_aside(folder, why)
    return [folder for folder, _ in damaged]


def verify_cache(cache_dir: Path, *, checksum: bool = True, move_damaged: bool = True) -> dict:
    """The checked manifest of a cache (`read_manifest`, `check_array`); a cache that fails is
    moved aside (when `move_damaged`) and reported, so the next workflow run rebuilds it instead
    of reusing it."""
    try:
        m = read_manifest(cache_dir)
        check_array(cache_dir, m, checksum=checksum)
    except CacheError as err:
        if move_damaged and set_cache_aside(cache_dir, str(err)):
            raise CacheError(f"{err}; the cache was moved aside and the next run rebuilds it") from None
        raise
    return m


def _npy_header(fh) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy file open at its start; leaves it at the data."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(fh)
