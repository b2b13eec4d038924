"""Backbone hidden-state caches: one (items+1, layers, d) array plus a JSON manifest.

Row i is item i of the preprocessed dataset (row 0 is padding, all zeros). Column j holds
h[stored_layers[j]] pooled per METHOD.md §2 ([CLS] token for BERT and ViT).
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .backbones import BackboneSpec, checkpoint_quantization, load_backbone
from .io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

ARRAY = "cache.npy"
MANIFEST = "manifest.json"


class CacheMismatch(ValueError):
    pass


def _pool(hidden_states: tuple[torch.Tensor, ...], pooling: str, mask: torch.Tensor | None) -> torch.Tensor:
    if pooling == "cls":
        return torch.stack([h[:, 0] for h in hidden_states], dim=1)  # (B, L+1, d)
    if pooling == "mean":
        return torch.stack([h.mean(dim=1) for h in hidden_states], dim=1)
    if pooling == "masked_mean":
        m = mask.unsqueeze(-1).to(hidden_states[0].dtype)
        return torch.stack([(h * m).sum(1) / m.sum(1).clamp_min(1) for h in hidden_states], dim=1)
    if pooling == "last":
        idx = mask.sum(1) - 1
        ar = torch.arange(idx.shape[0], device=idx.device)
        return torch.stack([h[ar, idx] for h in hidden_states], dim=1)
    raise ValueError(f"unknown pooling {pooling!r} (cls, mean, masked_mean, last)")


def _load_images(archive: Path, names: list[str | None], size: int) -> list:
    from PIL import Image

    out = []
    with zipfile.ZipFile(archive) as zf:
        for name in names:
            if name is None:
                out.append(Image.new("RGB", (size, size), (0, 0, 0)))  # blank image
            else:
                out.append(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))
    return out


def _token_lengths(tok, texts: list[str], max_tokens: int) -> np.ndarray:
    enc = tok(texts, max_length=max_tokens, truncation=True, padding=False)
    return np.array([len(x) for x in enc["input_ids"]])


def _encode(spec: BackboneSpec, tok, texts: list[str], dev: torch.device) -> dict:
    """Tokenise a batch. BERT: [CLS] title [SEP] padded to max_tokens with a mask. Decoders:
    BOS + title cut at max_tokens; the authors' unmasked mean pads to max_tokens with id 0 and
    passes no attention mask; masked mean and last token pad to the batch's longest (right)."""
    tok.padding_side = "right"
    if spec.is_decoder and spec.pooling == "mean":
        enc = tok(texts, max_length=spec.max_tokens, truncation=True, padding="max_length", return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(dev)}
    padding = "longest" if spec.is_decoder else "max_length"
    enc = tok(texts, max_length=spec.max_tokens, truncation=True, padding=padding, return_tensors="pt")
    out = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"].to(dev)
    return out


def _input_device(model) -> torch.device:
    return next(model.parameters()).device


def encode_batches(spec: BackboneSpec, model, pre, values: list, batches: list[np.ndarray], write, np_dtype,
                   *, images_archive: Path | None = None, desc: str = "cache", progress: bool | None = None) -> None:
    """Run the backbone over `batches` of item positions and call `write(b, idx, rows)` with
    the pooled states (len(idx), L+1, d) in `np_dtype`. On CUDA the device-to-host copy of batch
    b overlaps the forward pass of batch b+1 (pinned buffer, one batch in flight)."""
    in_dev = _input_device(model)
    cuda = in_dev.type == "cuda"
    torch_dtype = getattr(torch, np.dtype(np_dtype).name)
    pending = None

    def flush(p):
        b, idx, host, event = p
        if event is not None:
            event.synchronize()
        write(b, idx, host.numpy())

    for b, idx in enumerate(tqdm(batches, desc=desc, disable=None if progress is None else not progress)):
        chunk = [values[i] for i in idx]
        with torch.no_grad():
            if spec.modality == "text":
                enc = _encode(spec, pre, chunk, in_dev)
                out = model(**enc, output_hidden_states=True)
                pooled = _pool(out.hidden_states, spec.pooling, enc.get("attention_mask"))
            else:
                imgs = _load_images(images_archive, chunk, spec.image_size)
                px = pre(images=imgs, return_tensors="pt")["pixel_values"].to(in_dev, model.dtype)
                out = model(pixel_values=px, output_hidden_states=True)
                pooled = _pool(out.hidden_states, spec.pooling, None)
            pooled = pooled.to(torch_dtype)
            host = torch.empty(pooled.shape, dtype=torch_dtype, pin_memory=cuda)
            host.copy_(pooled, non_blocking=cuda)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
        if pending is not None:
            flush(pending)
        pending = (b, idx, host, event)
    if pending is not None:
        flush(pending)


def build_cache(
    spec: BackboneSpec,
    model_path: str,
    items_parquet: Path,
    field: str,
    out_dir: Path,
    *,
    images_archive: Path | None = None,
    batch_size: int = 64,
    store_dtype: str = "float16",
    device: str | None = None,
    progress: bool | None = None,
    checkpoint_every: int = 20,
) -> dict:
    """Run `spec` over `field` of every item and store all pooled hidden states.

    Text is batched by token length. Rows are written into ``cache.npy.partial`` with a record
    of finished items (``cache.done.npy``) every `checkpoint_every` batches, so an interrupted
    run resumes where it stopped; the array is renamed into place when complete."""
    import polars as pl

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
        if field not in items.columns:
            raise KeyError(f"{items_parquet}: no text field {field!r} (columns: {items.columns})")
        values = items[field].to_list()
        order = np.argsort(_token_lengths(pre, values, spec.max_tokens), kind="stable")
    else:
        if images_archive is None:
            raise ValueError(f"field {field!r}: an image backbone needs the dataset's image archive")
        values = items["image"].to_list()
        order = np.arange(n)

    shape = (n + 1, num_layers + 1, hidden)
    partial, done_path, key_path = out_dir / (ARRAY + ".partial"), out_dir / "cache.done.npy", out_dir / "cache.partial.json"
    key = {"backbone": spec.name, "field": field, "pooling": spec.pooling, "shape": list(shape), "dtype": store_dtype,
           "item_order_hash": stats["item_order_hash"], "quantization": spec.quantization}
    if partial.exists() and done_path.exists() and key_path.exists() and read_json(key_path) == key:
        arr = np.lib.format.open_memmap(partial, mode="r+")
        done = np.load(done_path)
        log.info("resuming %s: %d of %d items already cached", partial, int(done.sum()), n)
    else:
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np_dtype, shape=shape)
        arr[0] = 0
        done = np.zeros(n, dtype=bool)
        write_json(key_path, key)
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

    manifest = {
        "backbone": spec.name,
        "source": spec.source,
        "resolved_path": str(model_path),
        "revision": getattr(model.config, "_commit_hash", None),
        "family": spec.family,
        "modality": spec.modality,
        "field": field,
        "pooling": spec.pooling,
        "compute_dtype": str(model.dtype).replace("torch.", ""),
        "dtype": store_dtype,
        "quantization": spec.quantization or checkpoint_quantization(model_path),
        "tokenisation": {"max_tokens": spec.max_tokens, "bos": spec.is_decoder} if spec.modality == "text" else {"image_size": spec.image_size},
        "num_layers": num_layers,
        "stored_layers": list(range(num_layers + 1)),
        "hidden": hidden,
        "items": n,
        "item_order_hash": stats["item_order_hash"],
        "bytes": int((out_dir / ARRAY).stat().st_size),
        "device": str(dev),
        "library_version": __version__,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def prune_cache(src_dir: Path, out_dir: Path, layers: list[int]) -> dict:
    """Keep only hidden states `layers` (indices into h[0..L]) of a cache."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_json(src_dir / MANIFEST)
    stored = manifest["stored_layers"]
    missing = [l for l in layers if l not in stored]
    if missing:
        raise CacheMismatch(f"{src_dir}: layers {missing} are not stored (stored: {stored})")
    arr = np.load(src_dir / ARRAY, mmap_mode="r")
    cols = [stored.index(l) for l in layers]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / ARRAY, ".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(arr[:, cols]))
    manifest = dict(manifest, stored_layers=list(layers), pruned_from=str(src_dir), bytes=int((out_dir / ARRAY).stat().st_size))
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def load_cache(
    cache_dir: Path,
    *,
    backbone: str,
    layers: list[int],
    item_order_hash: str,
    pooling: str | None = None,
    field: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Load the hidden states `layers` of a (full or pruned) cache after checking its manifest
    against what the experiment asks for. Returns an (items+1, len(layers), d) array."""
    cache_dir = Path(cache_dir)
    mpath = cache_dir / MANIFEST
    if not mpath.exists():
        raise CacheMismatch(f"{cache_dir}: no {MANIFEST}; rebuild the cache")
    m = read_json(mpath)
    problems = []
    if m["backbone"] != backbone:
        problems.append(f"backbone is {m['backbone']!r}, the experiment asks for {backbone!r}")
    if m["item_order_hash"] != item_order_hash:
        problems.append(
            f"item order hash is {m['item_order_hash']}, the dataset's is {item_order_hash} "
            "(the dataset was preprocessed again or differently)"
        )
    if pooling is not None and m["pooling"] != pooling:
        problems.append(f"pooling is {m['pooling']!r}, the experiment asks for {pooling!r}")
    if field is not None and m["field"] != field:
        problems.append(f"field is {m['field']!r}, the experiment asks for {field!r}")
    missing = [l for l in layers if l not in m["stored_layers"]]
    if missing:
        problems.append(f"layers {missing} are not stored (stored: {m['stored_layers']})")
    if problems:
        raise CacheMismatch(f"cache {cache_dir} does not match the experiment: " + "; ".join(problems))
    arr = np.load(cache_dir / ARRAY, mmap_mode="r")
    cols = [m["stored_layers"].index(l) for l in layers]
    if arr.shape[0] != m["items"] + 1:
        raise CacheMismatch(f"{cache_dir}: array has {arr.shape[0]} rows, manifest says {m['items']} items + padding")
    return np.ascontiguousarray(arr[:, cols]), m
