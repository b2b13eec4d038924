"""Embedded fine-tuning of a backbone (the baselines of Table III, docs/method.md §8).

`prepare_backbone(model, family, method)` sets which backbone tensors train:

* ``fft``: every weight on the computation path (the pooler and ViT's final LayerNorm are not
  used: the item encoder reads the last hidden state h[L]).
* ``adapter``: Houlsby adapters (bottleneck 64) after the attention output projection and after
  the FFN output projection of every layer; only the adapters train.
* ``lora``: rank-8 LoRA on query and value of every layer through `peft`; the pretrained Q/V
  weights are kept (the authors' code re-initialised them); only the LoRA matrices train.
* ``bitfit``: only bias terms train.
* ``frozen``: nothing trains (IISAN uncached, frozen backbone).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

FINETUNE = ("fft", "adapter", "lora", "bitfit", "frozen")

# Houlsby adapters go after these projections (attention output, FFN output) of every layer.
# ViT's module names changed within transformers 5 (encoder.layer.N.attention.output.dense ->
# layers.N.attention.o_proj, output.dense -> mlp.fc2); both spellings are listed.
_ENCODER_ADAPTER = (
    r"layers?\.\d+\.attention\.output\.dense", r"encoder\.layers?\.\d+\.output\.dense",
    r"layers\.\d+\.attention\.o_proj", r"layers\.\d+\.mlp\.fc2",
)
_DECODER_ADAPTER = (r"layers\.\d+\.self_attn\.o_proj", r"layers\.\d+\.mlp\.down_proj")
ADAPTER_TARGETS = {"bert": _ENCODER_ADAPTER, "vit": _ENCODER_ADAPTER, "llama": _DECODER_ADAPTER,
                   "mistral": _DECODER_ADAPTER, "gemma": _DECODER_ADAPTER}
# LoRA on query and value of every layer (peft matches these as module-name suffixes)
_ENCODER_LORA = ["query", "value", "q_proj", "v_proj"]
LORA_TARGETS = {"bert": _ENCODER_LORA, "vit": _ENCODER_LORA, "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                "gemma": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"]}
# top-level modules off the computation path when the item encoder reads h[L]
UNUSED = {"bert": ("pooler.",), "vit": ("pooler.", "layernorm.")}


class HoulsbyAdapter(nn.Module):
    """y = base(x); y + W_up GELU(W_down y + b_down) + b_up. W_down ~ N(0, 0.01^2) and W_up = 0,
    so a fresh adapter is the identity (Houlsby et al.'s near-identity start)."""

    def __init__(self, base: nn.Linear, bottleneck: int = 64):
        super().__init__()
        self.base = base
        d = base.out_features
        self.adapter_down = nn.Linear(d, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, d)
        nn.init.normal_(self.adapter_down.weight, std=0.01)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter_up(F.gelu(self.adapter_down(y)))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def add_adapters(model: nn.Module, family: str, bottleneck: int = 64) -> int:
    if family not in ADAPTER_TARGETS:
        raise ValueError(f"adapters are not defined for backbone family {family!r} (known: {sorted(ADAPTER_TARGETS)})")
    pattern = re.compile(r"(^|\.)(" + "|".join(ADAPTER_TARGETS[family]) + r")$")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError(f"no adapter target modules found in the {family} backbone")
    for n in names:
        _set_module(model, n, HoulsbyAdapter(model.get_submodule(n), bottleneck))
    return len(names)


def add_lora(model: nn.Module, family: str, rank: int = 8, alpha: int = 8) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS[family], bias="none")
    return inject_adapter_in_model(cfg, model)


def trainable_names(model: nn.Module, family: str, method: str) -> list[str]:
    unused = UNUSED.get(family, ())
    names = []
    for n, _ in model.named_parameters():
        if method == "fft":
            keep = not n.startswith(unused)
        elif method == "adapter":
            keep = ".adapter_down." in n or ".adapter_up." in n
        elif method == "lora":
            keep = "lora_" in n
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


def prepare_backbone(model: nn.Module, family: str, method: str, *, adapter_bottleneck: int = 64, lora_rank: int = 8,
                     lora_alpha: int = 8) -> nn.Module:
    """Insert the method's modules and set requires_grad on exactly the tensors that train."""
    if method not in FINETUNE:
        raise ValueError(f"unknown fine-tuning method {method!r} (known: {', '.join(FINETUNE)})")
    if method == "adapter":
        add_adapters(model, family, adapter_bottleneck)
    elif method == "lora":
        model = add_lora(model, family, lora_rank, lora_alpha)
    train = set(trainable_names(model, family, method))
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    if method == "bitfit":
        for m in model.modules():
            if type(m) is nn.LayerNorm and m.elementwise_affine:
                m.__class__ = BiasOnlyLayerNorm
    return model
