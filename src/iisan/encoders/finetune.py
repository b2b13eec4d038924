"""Embedded fine-tuning of a backbone (the baselines of Table III, docs/method.md §8).

`prepare_backbone(model, family, method)` sets which backbone tensors train (the modules a
family's adapters follow and LoRA adapts, and its parameters off the computation path, are its
entry of the family registry, `iisan.encoders.families`):

* ``fft``: every weight on the computation path, ViT's final LayerNorm included (the item
  encoder reads the backbone's output state; BERT's pooler is not used).
* ``adapter``: the authors' adapter blocks (bottleneck 64, ReLU, both projections N(0, 0.01²))
  after the attention-output and FFN-output projections of every layer (for BERT after their
  dropout, as the authors' code); only the adapters train.
* ``lora``: rank-8 LoRA on query and value of every layer through `peft`, alpha 1 (scaling 1/8,
  `loralib`'s default in the authors' code) with the Q/V biases trained; the pretrained Q/V
  weights are kept (the authors' code re-initialised them); only the LoRA matrices and the Q/V
  biases train.
* ``bitfit``: only bias terms train.
* ``frozen``: nothing trains (IISAN uncached, frozen backbone).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from iisan.config import FinetuneConfig
from iisan.encoders import families

FINETUNE = ("fft", "adapter", "lora", "bitfit", "frozen")


class HoulsbyAdapter(nn.Module):
    """y = base(x); y + W_up ReLU(W_down y + b_down) + b_up, the authors' AdapterBlock: both
    weights N(0, 0.01^2), biases 0, so a fresh adapter is close to the identity. `base` is the
    module it follows (a projection, or a dropout of width `d`)."""

    def __init__(self, base: nn.Module, bottleneck: int, d: int | None = None):
        super().__init__()
        self.base = base
        d = d or base.out_features
        self.adapter_down = nn.Linear(d, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, d)
        for lin in (self.adapter_down, self.adapter_up):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter_up(F.relu(self.adapter_down(y)))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def add_adapters(model: nn.Module, family: str, bottleneck: int) -> int:
    targets = families.get(family).adapter
    if not targets:
        known = sorted(n for n, f in families.FAMILIES.items() if f.adapter)
        raise ValueError(f"adapters are not defined for backbone family {family!r} (known: {known})")
    pattern = re.compile(r"(^|\.)(" + "|".join(targets) + r")$")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Dropout) and pattern.search(n)]
    if not names:
        raise ValueError(f"no adapter target modules found in the {family} backbone")
    for n in names:
        _set_module(model, n, HoulsbyAdapter(model.get_submodule(n), bottleneck, d=model.config.hidden_size))
    return len(names)


def add_lora(model: nn.Module, family: str, rank: int, alpha: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    targets = families.get(family).lora
    if not targets:
        raise ValueError(f"LoRA targets are not defined for backbone family {family!r}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="lora_only")
    return inject_adapter_in_model(cfg, model)


def trainable_names(model: nn.Module, family: str, method: str) -> list[str]:
    unused = families.get(family).unused
    names = []
    for n, _ in model.named_parameters():
        if method == "fft":
            keep = not n.startswith(unused)
        elif method == "adapter":
            keep = ".adapter_down." in n or ".adapter_up." in n
        elif method == "lora":  # the LoRA matrices and the biases of the layers they adapt
            keep = "lora_" in n or n.endswith(".base_layer.bias")
        elif method == "bitfit":
            keep = n.endswith("bias") and not n.startswith(unused)
        else:
            keep = False
        if keep:
            names.append(n)
    return names


class BiasOnlyLayerNorm(nn.LayerNorm):
    """LayerNorm whose affine part runs outside the fused kernel, for BitFit (bias trains, weight
    frozen). PyTorch's CUDA LayerNorm backward returns a bias gradient of shape [0] when only the
    bias needs one and there are more than 65,536 rows (its two-stage reduction sizes the bias
    buffer from the absent weight gradient): ViT-base at 352 item slots per batch has 69,344 rows.
    Same function, same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers: its first ModuleList with one entry per layer
    (`config.num_hidden_layers`)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"no stack of {n} layers found in {type(model).__name__}")


def compile_layers(model: nn.Module, **options) -> int:
    """torch.compile each transformer layer of a backbone in place (regional compilation: one
    graph for a layer's code, reused by all of them; parameter names and state-dict keys stay as
    they were), so each layer's pointwise work (casts, dropout, residual adds, LayerNorm, GELU)
    runs in a few fused kernels. `options` go to torch.compile. Returns how many layers."""
    blocks = repeated_blocks(model)
    for layer in blocks:
        layer.compile(**options)
    return len(blocks)


def prepare_backbone(model: nn.Module, family: str, method: str, settings: FinetuneConfig | None = None) -> nn.Module:
    """Insert the method's modules (sizes from `settings`) and set requires_grad on exactly the
    tensors that train."""
    settings = settings or FinetuneConfig()
    if method not in FINETUNE:
        raise ValueError(f"unknown fine-tuning method {method!r} (known: {', '.join(FINETUNE)})")
    if method == "adapter":
        add_adapters(model, family, settings.adapter_bottleneck)
    elif method == "lora":
        model = add_lora(model, family, settings.lora_rank, settings.lora_alpha)
    train = set(trainable_names(model, family, method))
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    if method == "bitfit":
        for m in model.modules():
            if type(m) is nn.LayerNorm and m.elementwise_affine:
                m.__class__ = BiasOnlyLayerNorm
    return model
