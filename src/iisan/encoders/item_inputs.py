"""What the backbones read for an item, and how their hidden states become one vector per layer.

Shared by the cache builder (`iisan.encoders.cache`) and the backbones in the training loop
(`iisan.training.features`), so that both tokenise, load images and pool exactly alike
(docs/method.md §1-2).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from iisan.data import item_texts
from iisan.encoders.backbones import OUTPUT_NORM, BackboneSpec


def backbone_states(spec: BackboneSpec, out) -> tuple[torch.Tensor, ...]:
    """The states a cache stores, h[0..L], then the output state when the family's final norm
    follows h[L] (`iisan.encoders.backbones.output_layer`), from a forward pass with hidden states."""
    states = tuple(out.hidden_states)
    return states + (out.last_hidden_state,) if spec.family in OUTPUT_NORM else states


def pool_states(hidden_states: tuple[torch.Tensor, ...], pooling: str, mask: torch.Tensor | None) -> torch.Tensor:
    """One vector per hidden state: [(B, tokens, d)] * K -> (B, K, d), by `pooling`."""
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


def load_images(archive: Path, names: list[str | None], size: int, items: list | None = None, dataset: str | None = None) -> list:
    """RGB images `names` of a zip archive; None gives a black `size` x `size` image. A member
    that does not decode raises `iisan.data.images.UndecodableImage` naming the archive, the member,
    its item (``items[i]`` for ``names[i]``, by default the member's file stem) and the config key
    ``dataset_sources.<dataset>.missing_images: blank`` that gives it a blank image."""
    from PIL import Image

    from iisan.data.images import open_image

    out = []
    with zipfile.ZipFile(archive) as zf:
        for i, name in enumerate(names):
            if name is None:
                out.append(Image.new("RGB", (size, size), (0, 0, 0)))  # blank image
            else:
                out.append(open_image(zf, name, archive, None if items is None else items[i], dataset))
    return out


def encode_texts(spec: BackboneSpec, tok, texts: list[str], dev: torch.device) -> dict:
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


def item_inputs(spec: BackboneSpec, pre, items_parquet: Path, field: str, images_archive: Path | None,
                captions: Path | None = None) -> tuple[dict, tuple]:
    """Tokenised texts (text: a column, or the caption set `captions` of a caption field) or resized
    uint8 images (image) of every item, row 0 = padding.
    Text uses the cache's tokenisation (docs/method.md §1); images the backbone's processor with the
    rescale/normalise done on the device, which gives the processor's values exactly."""
    import polars as pl

    items = pl.read_parquet(items_parquet)
    if spec.modality == "text":
        texts = [""] + item_texts(items_parquet, field, captions)
        enc = encode_texts(spec, pre, texts, torch.device("cpu"))
        return enc, (None, None)
    if images_archive is None:
        raise ValueError(f"field {field!r}: an image backbone needs the dataset's image archive")
    names, ids = items["image"].to_list(), items["item_id"].to_list()
    size = spec.image_size
    chunks = [torch.zeros(1, 3, size, size, dtype=torch.uint8)]
    for s in range(0, len(names), 512):
        # the dataset's folder (resources/<dataset>) is named after its dataset_sources entry
        imgs = load_images(Path(images_archive), names[s : s + 512], size, ids[s : s + 512], Path(items_parquet).parent.name)
        px = pre(images=imgs, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
        chunks.append(torch.as_tensor(px).to(torch.uint8))
    pixels = torch.cat(chunks)
    if pixels.shape[-1] != size:
        chunks[0] = torch.zeros(1, *pixels.shape[1:], dtype=torch.uint8)
        pixels = torch.cat(chunks)
    return {"pixels": pixels}, (list(pre.image_mean), list(pre.image_std))
