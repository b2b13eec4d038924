"""Backbone hidden-state caches: one (items+1, layers, d) array plus a JSON manifest.

Row i is item i of the preprocessed dataset (row 0 is padding, all zeros). Column j holds
h[stored_layers[j]] pooled per docs/method.md §2 ([CLS] token for BERT and ViT); index
`output_layer` is the backbone's output state: h[L], or for ViT h[L] after its final LayerNorm,
stored as h[L+1].

A cache is trusted only as far as its manifest vouches for it, and the manifest only as far as
its own checksum (field `manifest_checksum`, xxh3-128 of every other field) vouches for it: an
edited field is detected. Every field is checked (`read_manifest`), the array must have the
manifest's shape, dtype and size in bytes (`check_array`), and readers that load the whole array
compare its xxh3-128 checksum. The `settings` field records everything that determines a state
(model source, revision and a fingerprint of its files, tokenisation or image settings, compute
and storage dtype, pooling, quantisation, item order); an interrupted build resumes only under
identical settings.

A cache that fails any of these checks, or (for the workflow's training jobs) does not match
what the experiment asks for, is moved aside (``cache.npy.damaged-<time>``,
``manifest.json.damaged-<time>``; nothing is deleted), so that the workflow rebuilds it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import xxhash
from tqdm.auto import tqdm

from iisan import __version__
from iisan.data import item_texts
from iisan.encoders.backbones import BackboneSpec, checkpoint_quantization, load_backbone
from iisan.encoders.cache_files import (
    ARRAY,
    CHECKSUM,
    MANIFEST,
    CacheError,
    CacheMismatch,
    _npy_header,
    file_checksum,
    read_manifest,
    set_cache_aside,
    verify_cache,
    write_manifest,
)
from iisan.encoders.cache_job import CacheJob
from iisan.encoders.item_inputs import backbone_states, encode_texts, load_images, pool_states
from iisan.io import atomic_path, read_json, require_free_space, write_json

log = logging.getLogger(__name__)

def _token_lengths(tok, texts: list[str], max_tokens: int) -> np.ndarray:
    enc = tok(texts, max_length=max_tokens, truncation=True, padding=False)
    return np.array([len(x) for x in enc["input_ids"]])


def _input_device(model) -> torch.device:
    return next(model.parameters()).device


def encode_batches(spec: BackboneSpec, model, pre, values: list, batches: list[np.ndarray], write, np_dtype,
                   *, images_archive: Path | None = None, desc: str = "cache", progress: bool | None = None) -> None:
    """Run the backbone over `batches` of item positions and call `write(b, idx, rows)` with
    the pooled states (len(idx), K, d) in `np_dtype` (K = output layer + 1: h[0..L] and, for
    ViT, the output after the final LayerNorm). On CUDA the device-to-host copy of batch
    b overlaps the forward pass of batch b+1 (pinned buffer, one batch in flight). A state that
    float16 storage cannot hold (beyond ±65504) stops the build, naming the backbone and layer,
    instead of being stored as inf."""
    in_dev = _input_device(model)
    cuda = in_dev.type == "cuda"
    torch_dtype = getattr(torch, np.dtype(np_dtype).name)
    pending = None

    def flush(p):
        b, idx, host, overflow, event = p
        if event is not None:
            event.synchronize()
        if overflow is not None and overflow.any():
            layers = overflow.nonzero().flatten().tolist()
            raise ValueError(f"backbone {spec.name}: hidden states h{layers} hold values beyond the float16 range "
                             f"(±65504); store this cache as float32 (config key cache.dtype)")
        write(b, idx, host.numpy())

    for b, idx in enumerate(tqdm(batches, desc=desc, disable=None if progress is None else not progress)):
        chunk = [values[i] for i in idx]
        with torch.no_grad():
            if spec.modality == "text":
                enc = encode_texts(spec, pre, chunk, in_dev)
                out = model(**enc, output_hidden_states=True)
                pooled = pool_states(backbone_states(spec, out), spec.pooling, enc.get("attention_mask"))
            else:
                imgs = load_images(images_archive, chunk, spec.image_size)
                px = pre(images=imgs, return_tensors="pt")["pixel_values"].to(in_dev, model.dtype)
                out = model(pixel_values=px, output_hidden_states=True)
                pooled = pool_states(backbone_states(spec, out), spec.pooling, None)
            stored = pooled.to(torch_dtype)
            overflow = None
            if torch_dtype == torch.float16:  # per state h[l]: a finite value that became inf
                lost = (torch.isinf(stored) & torch.isfinite(pooled)).flatten(2).any(dim=2).any(dim=0)
                overflow = torch.empty(lost.shape, dtype=torch.bool, pin_memory=cuda)
                overflow.copy_(lost, non_blocking=cuda)
            host = torch.empty(stored.shape, dtype=torch_dtype, pin_memory=cuda)
            host.copy_(stored, non_blocking=cuda)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
        if pending is not None:
            flush(pending)
        pending = (b, idx, host, overflow, event)
    if pending is not None:
        flush(pending)


FINGERPRINT_SAMPLE = 1 << 24  # bytes hashed at each end of a large weight file


def weights_fingerprint(model_path: str, revision: str | None) -> str:
    """What identifies the weights (and tokenizer / processor files) a cache was computed with:
    for a local folder, every file's name and size, small files hashed whole and large ones at
    both ends (a 140 GB checkpoint in about a second); for a hub id, the id and its commit."""
    folder = Path(model_path)
    if not folder.is_dir():
        return f"hub:{model_path}@{revision}"
    h = xxhash.xxh3_128()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * FINGERPRINT_SAMPLE:
                h.update(fh.read())
            else:
                h.update(fh.read(FINGERPRINT_SAMPLE))
                fh.seek(-FINGERPRINT_SAMPLE, os.SEEK_END)
                h.update(fh.read())
    return f"{CHECKSUM}:{h.hexdigest()}"


def cache_settings(spec: BackboneSpec, model_path: str, model, pre, field: str, store_dtype: str, item_order_hash: str,
                   device: torch.device) -> dict:
    """Everything that determines the cached states: a partial cache resumes only under equal
    settings, and the manifest records them."""
    revision = getattr(model.config, "_commit_hash", None)
    if spec.modality == "text":
        inputs = {"max_tokens": spec.max_tokens, "bos": spec.is_decoder,
                  "padding": "max_length" if (spec.pooling == "mean" or not spec.is_decoder) else "longest"}
    else:
        inputs = {"image_size": spec.image_size, "processor": json.loads(json.dumps(pre.to_dict(), default=str))}
    return {
        "backbone": spec.name,
        "source": spec.source,
        "revision": revision,
        "weights": weights_fingerprint(model_path, revision),
        "field": field,
        "inputs": inputs,
        "pooling": spec.pooling,
        "compute_dtype": str(model.dtype).replace("torch.", ""),
        "dtype": store_dtype,
        "quantization": spec.quantization or checkpoint_quantization(model_path),
        "item_order_hash": item_order_hash,
        "device_type": device.type,
        "library_version": __version__,
    }


def build_cache(
    job: CacheJob,
    model_path: str,
    items_parquet: Path,
    out_dir: Path,
    *,
    images_archive: Path | None = None,
    captions: Path | None = None,
    device: str | None = None,
    progress: bool | None = None,
    checkpoint_every: int = 20,
) -> dict:
    """Run the job's backbone over its field of every item and store all pooled hidden states,
    `job.batch_size` items per batch, as `job.store_dtype` (a caption field's texts from the
    caption set `captions`, by default the one beside the item table).

    Text is batched by token length. Rows are written into ``cache.npy.partial`` with a record
    of finished items (``cache.done.npy``) every `checkpoint_every` batches, so an interrupted
    run resumes where it stopped; the array is renamed into place when complete."""
    import polars as pl

    spec, field, batch_size, store_dtype = job.spec, job.field, job.batch_size, job.store_dtype
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    items = pl.read_parquet(items_parquet)
    stats = read_json(Path(items_parquet).with_name("stats.json"))
    model, pre = load_backbone(spec, model_path, dev)
    n = items.height
    num_layers = model.config.num_hidden_layers
    hidden = model.config.hidden_size
    if num_layers != spec.layers or hidden != spec.hidden:
        raise CacheMismatch(
            f"backbone {spec.name}: registry says {spec.layers} layers x {spec.hidden} wide, "
            f"the checkpoint at {model_path} has {num_layers} x {hidden}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(store_dtype)
    if spec.modality == "text":
        values = item_texts(items_parquet, field, captions)
        order = np.argsort(_token_lengths(pre, values, spec.max_tokens), kind="stable")
    else:
        if images_archive is None:
            raise ValueError(f"field {field!r}: an image backbone needs the dataset's image archive")
        values = items["image"].to_list()
        order = np.arange(n)

    states = spec.output_layer + 1  # h[0..L], and LayerNorm(h[L]) where the family has a final norm
    shape = (n + 1, states, hidden)
    settings = cache_settings(spec, model_path, model, pre, field, store_dtype, stats["item_order_hash"], dev)
    partial, done_path, key_path = out_dir / (ARRAY + ".partial"), out_dir / "cache.done.npy", out_dir / "cache.partial.json"
    key = dict(settings, shape=list(shape))
    arr, done = _resumable_partial(partial, done_path, key_path, key, np_dtype, shape)
    need = array_bytes(shape, np_dtype)
    if arr is None:
        done = np.zeros(n, dtype=bool)
        done_path.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        require_free_space(partial, need)
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np_dtype, shape=shape)
        arr[0] = 0
        write_json(key_path, key)
    else:
        require_free_space(partial, max(0, need - partial.stat().st_blocks * 512))  # the file is sparse until written
        log.info("resuming %s: %d of %d items already cached", partial, int(done.sum()), n)
    todo = order[~done[order]]
    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]

    def write(b: int, idx: np.ndarray, rows: np.ndarray) -> None:
        arr[1 + idx] = rows
        done[idx] = True
        if (b + 1) % checkpoint_every == 0:
            arr.flush()
            with atomic_path(done_path, ".npy") as tmp:
                np.save(tmp, done)

    encode_batches(spec, model, pre, values, batches, write, np_dtype, images_archive=images_archive,
                   desc=f"cache {spec.name}/{field}", progress=progress)
    arr.flush()
    os.replace(partial, out_dir / ARRAY)
    done_path.unlink(missing_ok=True)
    key_path.unlink(missing_ok=True)

    array = out_dir / ARRAY
    manifest = {
        "backbone": spec.name,
        "source": spec.source,
        "resolved_path": str(model_path),
        "revision": settings["revision"],
        "family": spec.family,
        "modality": spec.modality,
        "field": field,
        "pooling": spec.pooling,
        "compute_dtype": settings["compute_dtype"],
        "dtype": store_dtype,
        "quantization": settings["quantization"],
        "tokenisation": {"max_tokens": spec.max_tokens, "bos": spec.is_decoder} if spec.modality == "text" else {"image_size": spec.image_size},
        "num_layers": num_layers,
        "output_layer": spec.output_layer,
        "stored_layers": list(range(states)),
        "hidden": hidden,
        "items": n,
        "item_order_hash": stats["item_order_hash"],
        "shape": list(shape),
        "bytes": int(array.stat().st_size),
        "checksum": file_checksum(array),
        "device": str(dev),
        "library_version": __version__,
        "settings": settings,
    }
    return write_manifest(out_dir, manifest)


def array_bytes(shape, dtype) -> int:
    """At least the bytes of a .npy file holding an array of `shape` and `dtype`."""
    return 4096 + int(np.prod(shape)) * np.dtype(dtype).itemsize  # the header takes well under 4 KiB


def _resumable_partial(partial: Path, done_path: Path, key_path: Path, key: dict, np_dtype, shape):
    """(the partial array of an interrupted build opened for writing, its record of finished
    items) if it was built under exactly `key`; otherwise (None, None): a partial file from
    other settings is discarded, logged."""
    if not partial.exists():
        return None, None
    old = None
    try:
        old = read_json(key_path)
        done = np.load(done_path)
        arr = np.lib.format.open_memmap(partial, mode="r+")
    except (OSError, ValueError) as err:
        log.warning("discarding the partial cache %s: its records are unreadable (%s)", partial, err)
        return None, None
    if old != key:
        differ = sorted(k for k in set(key) | set(old if isinstance(old, dict) else {})
                        if not isinstance(old, dict) or old.get(k) != key.get(k))
        log.warning("discarding the partial cache %s: it was built with other settings (%s differ)", partial, ", ".join(differ))
        return None, None
    if arr.shape != tuple(shape) or arr.dtype != np_dtype or done.shape != (shape[0] - 1,):
        log.warning("discarding the partial cache %s: its array is %s %s", partial, arr.shape, arr.dtype)
        return None, None
    return arr, done


def prune_cache(src_dir: Path, out_dir: Path, layers: list[int]) -> dict:
    """Keep only hidden states `layers` (increasing indices into h[0..L]) of a cache. The source
    is checked in full first (manifest, size, header, checksum)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = verify_cache(src_dir)
    stored = manifest["stored_layers"]
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"prune {src_dir}: layers {layers} must be strictly increasing")
    missing = [l for l in layers if l not in stored]
    if missing:
        raise CacheMismatch(f"{src_dir}: layers {missing} are not stored (stored: {stored})")
    arr = np.load(src_dir / ARRAY, mmap_mode="r")
    cols = [stored.index(l) for l in layers]
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = [manifest["items"] + 1, len(layers), manifest["hidden"]]
    require_free_space(out_dir / ARRAY, array_bytes(shape, arr.dtype))
    with atomic_path(out_dir / ARRAY, ".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(arr[:, cols]))
    array = out_dir / ARRAY
    manifest = dict(manifest, stored_layers=list(layers), shape=shape,
                    pruned_from=str(src_dir), bytes=int(array.stat().st_size), checksum=file_checksum(array))
    return write_manifest(out_dir, manifest)


def load_cache(
    cache_dir: Path,
    *,
    backbone: str,
    layers: list[int],
    item_order_hash: str,
    pooling: str | None = None,
    field: str | None = None,
    hidden: int | None = None,
    num_layers: int | None = None,
    dtype: str | None = None,
    source: str | None = None,
    family: str | None = None,
    move_mismatched: bool = False,
) -> tuple[np.ndarray, dict]:
    """Load the hidden states `layers` of a (full or pruned) cache after checking every manifest
    field against the array (shape, dtype, bytes, checksum) and against what the experiment asks
    for (the keyword arguments; None skips a check). Returns an (items+1, len(layers), d) array.

    A damaged cache is moved aside (`verify_cache`). With `move_mismatched` (the workflow's
    training jobs), so is a sound cache that does not match, and the full cache a pruned one was
    made from when that does not match either, so that the next run rebuilds them under the
    config's settings instead of failing the same way again."""
    cache_dir = Path(cache_dir)
    m = verify_cache(cache_dir)
    asked = {"backbone": backbone, "item_order_hash": item_order_hash, "pooling": pooling, "field": field,
             "hidden": hidden, "num_layers": num_layers, "dtype": dtype, "source": source, "family": family}
    problems = _mismatches(m, asked)
    missing = [l for l in layers if l not in m["stored_layers"]]
    if missing:
        problems.append(f"layers {missing} are not stored (stored: {m['stored_layers']})")
    if problems:
        message = f"cache {cache_dir} does not match the experiment: " + "; ".join(problems)
        if move_mismatched:
            moved = set_cache_aside(cache_dir, "; ".join(problems))
            source_dir = Path(m["pruned_from"]) if "pruned_from" in m else None
            if source_dir is not None and (source_dir / MANIFEST).is_file():
                try:
                    if _mismatches(read_manifest(source_dir), asked):
                        moved += set_cache_aside(source_dir, "the cache pruned from it does not match the experiment")
                except CacheError as err:
                    moved += set_cache_aside(source_dir, str(err))
            message += f"; moved aside ({', '.join(map(str, moved))}), so the next run rebuilds it under the config's settings"
        raise CacheMismatch(message)
    return read_layers(cache_dir / ARRAY, [m["stored_layers"].index(l) for l in layers]), m


def _mismatches(m: dict, asked: dict) -> list[str]:
    """What a manifest says differently from what is asked (None: not checked)."""
    problems = []
    for key, want in asked.items():
        if want is None or m[key] == want:
            continue
        if key == "item_order_hash":
            problems.append(f"item order hash is {m[key]}, the dataset's is {want} "
                            "(the dataset was preprocessed again or differently)")
        else:
            problems.append(f"{key} is {m[key]!r}, the experiment asks for {want!r}")
    return problems


def read_layers(path: Path, cols: list[int], chunk_bytes: int = 64 << 20) -> np.ndarray:
    """States `cols` (indices into axis 1) of a cache array, read once from the file: the whole
    array in one read when `cols` is every state, else row blocks of about `chunk_bytes` through
    one buffer (a memory-mapped fancy index and a contiguous copy took 3x as long)."""
    with open(path, "rb") as fh:
        shape, fortran, dtype = _npy_header(fh)
        if fortran or len(shape) != 3:
            raise CacheError(f"{path}: expected a C-ordered (items + 1, states, hidden) array, found shape {shape}")
        dtype = np.dtype(dtype)
        out = np.empty((shape[0], len(cols), shape[2]), dtype)
        if list(cols) == list(range(shape[1])):
            _read_into(fh, out, path)
            return out
        rows = max(1, chunk_bytes // (shape[1] * shape[2] * dtype.itemsize))
        buf = np.empty((rows, shape[1], shape[2]), dtype)
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            _read_into(fh, buf[:n], path)
            out[start : start + n] = buf[:n, cols]
    return out


def _read_into(fh, arr: np.ndarray, path: Path) -> None:
    view = memoryview(arr).cast("B")
    if fh.readinto(view) != view.nbytes:
        raise CacheError(f"{path}: shorter than its .npy header says (truncated)")
