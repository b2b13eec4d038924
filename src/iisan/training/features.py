"""Where item features come from during training: the cache, the backbones themselves, or IDs.

A *feature source* turns flat item ids (M,) into what the item encoder reads:

* `CachedFeatures`: rows of the cached hidden states (the IISAN way, docs/method.md §2).
* `BackboneFeatures`: the backbones run on the items' tokenised titles and images at every step
  (FFT, Adapter, LoRA, BitFit, and IISAN uncached). Frozen backbones run in eval mode under
  no_grad and their states are rounded to the cache's storage dtype, so IISAN uncached computes
  exactly what IISAN cached computes.
* `IdFeatures`: the ids themselves (ID-based SASRec and GRU4Rec).

Each implements `FeatureSource`, the one interface the Trainer reads. Row/id 0 is padding: its
features are zeros, as in the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iisan.config import FinetuneConfig
from iisan.encoders.backbones import BackboneSpec, load_backbone
from iisan.encoders.finetune import prepare_backbone
from iisan.encoders.item_inputs import backbone_states, item_inputs, pool_states

log = logging.getLogger(__name__)


class FeatureSource:
    """Where the item encoder's inputs come from: what the Trainer may ask of a source.

    `gather(ids)` gives the features of flat item ids (M,) for a training step, `rows(start, end)`
    those of items start..end-1 for evaluation (at most `chunk_size` at a time). `dims[f]` and
    `layers[f]` are the width and the number of states of field f, `n_rows` is N+1 (row 0 =
    padding). `module`: an nn.Module whose tensors the model holds (the backbones in the loop),
    else None. `finetune`: what trains in those backbones (frozen | fft | adapter | lora |
    bitfit), None without backbones. `to(device)` moves the source and returns it.
    """

    module: nn.Module | None = None
    finetune: str | None = None
    chunk_size: int = 2048
    n_rows: int
    dims: list[int]
    layers: list[int]

    def to(self, device: torch.device) -> FeatureSource:
        raise NotImplementedError

    def gather(self, ids: torch.Tensor):
        raise NotImplementedError

    def rows(self, start: int, end: int):
        raise NotImplementedError


class CachedFeatures(FeatureSource):
    """Per field an (N+1, K, d) cache held on the training device; `layer_index[f]` selects the
    states that feed the side network from a full cache (Fig. 7's "full cache" setting)."""

    def __init__(self, caches: list, layer_index: list[list[int] | None] | None = None):
        self.caches = [c if isinstance(c, torch.Tensor) else torch.from_numpy(np.asarray(c)) for c in caches]
        self.layer_index = layer_index or [None] * len(caches)

    def to(self, device: torch.device) -> CachedFeatures:
        # on CUDA the stored dtype (each step converts the rows it gathers), on a CPU float32
        self.caches = [c.to(device) if device.type == "cuda" else c.to(device, torch.float32) for c in self.caches]
        self.layer_index = [None if i is None else torch.as_tensor(i, device=device) for i in self.layer_index]
        return self

    @property
    def n_rows(self) -> int:
        return self.caches[0].shape[0]

    @property
    def dims(self) -> list[int]:
        return [c.shape[2] for c in self.caches]

    @property
    def layers(self) -> list[int]:
        return [c.shape[1] if i is None else len(i) for c, i in zip(self.caches, self.layer_index)]

    @staticmethod
    def _select(rows: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return (rows if idx is None else rows[:, idx]).float()

    def gather(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [self._select(c[ids], i) for c, i in zip(self.caches, self.layer_index)]

    def rows(self, start: int, end: int) -> list[torch.Tensor]:
        return [self._select(c[start:end], i) for c, i in zip(self.caches, self.layer_index)]


class IdFeatures(FeatureSource):
    """ID-based models: the item encoder is an embedding table, so the features are the ids."""

    chunk_size = 1 << 20
    dims: list[int] = []
    layers: list[int] = []

    def __init__(self, n_items: int):
        self.n_rows = n_items + 1

    def to(self, device: torch.device) -> IdFeatures:
        self.device = device
        return self

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def rows(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device)


@dataclass
class Tower:
    """One item field and the backbone that reads it."""

    spec: BackboneSpec
    path: str  # what from_pretrained loads
    field: str
    layers: list[int]  # indices into the cached states (h[0..L], output) that the item encoder reads
    store_dtype: str = "float32"  # the cache's storage dtype: frozen states are rounded to it
    captions: Path | None = None  # the caption set a caption field reads (None: the one beside the item table)


class BackboneTower(nn.Module):
    def __init__(self, tower: Tower, model: nn.Module, inputs: dict[str, torch.Tensor], image_mean=None, image_std=None):
        super().__init__()
        self.spec = tower.spec
        self.layers = list(tower.layers)
        self.round_to = getattr(torch, tower.store_dtype)
        self.backbone = model
        self.inputs = inputs  # plain tensors, (N+1, ...) each; moved by `to_device`
        if image_mean is not None:
            self.register_buffer("mean", torch.tensor(image_mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(image_std).view(1, -1, 1, 1), persistent=False)

    def to_device(self, device: torch.device) -> None:
        self.to(device)
        self.inputs = {k: v.to(device) for k, v in self.inputs.items()}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (u,) item ids >= 1 -> (u, K, d)
        # a tower that reads the output state only (the fine-tuning baselines) takes it as the
        # backbone's last_hidden_state: no per-layer hooks collecting every hidden state (each
        # one a graph break inside a compiled layer)
        every = self.layers != [self.spec.output_layer]
        if self.spec.modality == "text":
            enc = {k: v[ids] for k, v in self.inputs.items()}
            out = self.backbone(**enc, output_hidden_states=every)
            mask = enc.get("attention_mask")
        else:
            dtype = next(self.backbone.parameters()).dtype
            px = (self.inputs["pixels"][ids].to(dtype) / 255 - self.mean.to(dtype)) / self.std.to(dtype)
            out = self.backbone(pixel_values=px, output_hidden_states=every)
            mask = None
        if not every:
            return pool_states((out.last_hidden_state,), self.spec.pooling, mask)
        hs = backbone_states(self.spec, out)
        return pool_states(tuple(hs[l] for l in self.layers), self.spec.pooling, mask)


class BackboneFeatures(nn.Module, FeatureSource):
    """Backbones in the training loop. `finetune` is fft | adapter | lora | bitfit | frozen; with
    frozen backbones the states are computed under no_grad in eval mode and rounded to each
    tower's cache storage dtype (`Tower.store_dtype`). `item_slots` (all | real | distinct, the training config's)
    is fixed when the source is built (see `gather`). `pad_to`: the rows of a call (its real or
    distinct items) are padded up to a multiple of it (an item repeated, its extra rows dropped): fewer shapes for the
    backbones (set by `iisan.training.fast_step` on CUDA; 1 leaves them as they are)."""

    chunk_size = 256

    def __init__(self, towers: list[BackboneTower], finetune: str, item_slots: str = "all"):
        super().__init__()
        self.towers = nn.ModuleList(towers)
        self.finetune = finetune
        self.item_slots = item_slots  # all | real | distinct (see `gather`)
        self.n_rows = next(iter(towers[0].inputs.values())).shape[0]
        self.pad_to = 1

    @property
    def module(self) -> nn.Module:
        return self

    @property
    def dims(self) -> list[int]:
        return [t.spec.hidden for t in self.towers]

    @property
    def layers(self) -> list[int]:
        return [len(t.layers) for t in self.towers]

    def to(self, *args, **kwargs):  # noqa: D401 - nn.Module.to plus the inputs
        if args and isinstance(args[0], (torch.device, str)) and not kwargs:
            dev = torch.device(args[0])
            for t in self.towers:
                t.to_device(dev)
            return self
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.finetune == "frozen":
            super().train(False)  # frozen backbones always run in eval mode
        return self

    def _states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Features of item ids (>= 1 each), one (u, K, d) tensor per tower."""
        if self.finetune == "frozen":
            with torch.no_grad():
                return [t(ids).to(t.round_to).float() for t in self.towers]
        return [t(ids).float() for t in self.towers]

    def gather(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Features of every slot of `ids` (M,); padding slots (id 0) get zeros.

        item_slots = "all" runs every slot through the backbones, padding and repeated items
        included, as the authors' code does (their time and memory figures count this work).
        "real" runs every slot that holds an item, repeats included, and skips the padding: the
        authors' model, each slot with its own dropout mask, without the work whose output is
        zeroed (with dropout the random numbers fall on other rows, so a seed gives other masks).
        "distinct" runs each distinct item of the batch once: the same model with less work; with
        trainable backbones it differs only in that repeated items share one dropout mask.
        """
        if self.item_slots == "all":
            keep = (ids != 0).unsqueeze(1).unsqueeze(2)  # (M, 1, 1)
            return [torch.where(keep, f, torch.zeros((), dtype=f.dtype, device=f.device)) for f in self._states(ids)]
        if self.item_slots == "real":
            return self._real(ids)
        return self._distinct(ids)

    def _padded_states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """`_states` of `ids` (>= 1 each, at least one), run padded to a multiple of `pad_to` rows
        (the first item repeated, its extra rows dropped)."""
        n = ids.numel()
        padded = -(-n // self.pad_to) * self.pad_to
        if padded > n:
            ids = torch.cat([ids, ids[:1].expand(padded - n)])
        return [f[:n] for f in self._states(ids)]

    def _real(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Every slot of `ids` that holds an item runs (padded to a multiple of `pad_to`); padding
        slots get zeros."""
        where = torch.nonzero(ids != 0).squeeze(1)
        out = [torch.zeros(ids.shape[0], len(t.layers), t.spec.hidden, device=ids.device) for t in self.towers]
        if where.numel():
            out = [o.index_put((where,), f.to(o.dtype)) for o, f in zip(out, self._padded_states(ids[where]))]
        return out

    def _distinct(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Each distinct item of `ids` runs once (padded to a multiple of `pad_to`)."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        real = uniq[uniq != 0]
        feats = self._padded_states(real) if real.numel() else None
        out = []
        for f, t in enumerate(self.towers):
            full = torch.zeros(uniq.shape[0], len(t.layers), t.spec.hidden, device=ids.device)
            if feats is not None:
                full = full.index_put((torch.nonzero(uniq != 0).squeeze(1),), feats[f].to(full.dtype))
            out.append(full[inv])
        return out

    def rows(self, start: int, end: int) -> list[torch.Tensor]:  # evaluation: every item once
        return self._distinct(torch.arange(start, end, device=next(iter(self.towers[0].inputs.values())).device))


def build_backbone_features(towers: list[Tower], items_parquet: Path, finetune: str, *, images_archive: Path | None = None,
                            device: torch.device | None = None,
                            settings: FinetuneConfig | None = None,
                            item_slots: str = "all") -> BackboneFeatures:
    import dataclasses

    device = device or torch.device("cpu")
    mods = []
    for t in towers:
        # trainable backbones keep fp32 master weights (bf16 autocast does the mixed precision)
        spec = t.spec if finetune == "frozen" else dataclasses.replace(t.spec, dtype="float32")
        model, pre = load_backbone(spec, t.path, torch.device("cpu"))
        if finetune != "frozen" and getattr(model, "is_quantized", False):
            raise ValueError(f"backbone {t.spec.name}: {finetune} needs trainable weights, not a quantised checkpoint")
        model = prepare_backbone(model, t.spec.family, finetune, settings)
        inputs, (mean, std) = item_inputs(t.spec, pre, items_parquet, t.field, images_archive, t.captions)
        mods.append(BackboneTower(t, model, inputs, mean, std))
    return BackboneFeatures(mods, finetune, item_slots).to(device)
