"""Backbone registry entries, demo stand-ins, and loading a backbone with its preprocessor.

A registry entry (config key ``backbones``) maps a short name to:
``source`` (a Hugging Face id, a local folder, ``package:<module>`` for a model folder shipped in
a Python package, or ``demo`` for a generated stand-in), ``family`` (bert | vit), ``modality``
(text | image), ``layers``, ``hidden``, ``dtype`` (the compute dtype), ``pooling`` (cls).
"""

from __future__ import annotations

import importlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import atomic_path

log = logging.getLogger(__name__)

FAMILIES = {"bert": "text", "vit": "image"}


@dataclass
class BackboneSpec:
    name: str
    source: str
    family: str
    modality: str
    layers: int
    hidden: int
    dtype: str = "float32"
    pooling: str = "cls"
    max_tokens: int = 30
    image_size: int = 224
    heads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, entry: dict[str, Any]) -> "BackboneSpec":
        known = {k: entry[k] for k in entry if k in cls.__dataclass_fields__ and k != "extra"}
        extra = {k: v for k, v in entry.items() if k not in cls.__dataclass_fields__}
        spec = cls(name=name, **known, extra=extra)
        if spec.family not in FAMILIES:
            raise ValueError(f"backbones.{name}.family: unknown family {spec.family!r} (known: {sorted(FAMILIES)})")
        return spec


def resolve_source(spec: BackboneSpec, standin_dir: Path | None = None) -> str:
    """The folder or hub id that `from_pretrained` should load."""
    src = spec.source
    if src == "demo":
        if standin_dir is None:
            raise ValueError(f"backbone {spec.name}: a demo stand-in needs its folder")
        return str(standin_dir)
    if src.startswith("package:"):
        module = src.split(":", 1)[1]
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            raise RuntimeError(
                f"backbone {spec.name}: source {src!r} needs the Python package {module!r} "
                f"(pip install {module.replace('_', '-')})"
            ) from err
        return str(mod.get_model_path())
    return src


def build_standin(spec: BackboneSpec, out_dir: Path, titles: list[str] | None = None, seed: int = 0) -> None:
    """Build a randomly initialised stand-in with the real layer count and a tiny width and save
    it with `save_pretrained` (plus tokenizer or image-processor config)."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if spec.family == "bert":
        tokenizer = train_wordpiece_tokenizer(titles or [], vocab_size=int(spec.extra.get("vocab_size", 2000)))
        cfg = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=4 * spec.hidden,
            max_position_embeddings=max(64, spec.max_tokens),
            initializer_range=float(spec.extra.get("initializer_range", 0.02)),
        )
        model = BertModel(cfg, add_pooling_layer=False)
        tokenizer.save_pretrained(tmp)
    elif spec.family == "vit":
        from transformers import ViTImageProcessor

        cfg = ViTConfig(
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=4 * spec.hidden,
            image_size=spec.image_size,
            patch_size=int(spec.extra.get("patch_size", 8)),
            initializer_range=float(spec.extra.get("initializer_range", 0.02)),
        )
        model = ViTModel(cfg, add_pooling_layer=False)
        ViTImageProcessor(
            size={"height": spec.image_size, "width": spec.image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(tmp)
    else:  # pragma: no cover - guarded by BackboneSpec
        raise ValueError(spec.family)
    model.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A BERT WordPiece tokenizer trained offline on `texts` (for demo stand-ins)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def load_backbone(spec: BackboneSpec, path: str, device: torch.device):
    """Load (model, preprocessor) in eval mode on `device`."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    dtype = getattr(torch, spec.dtype)
    if device.type == "cpu" and dtype in (torch.float16,):
        dtype = torch.float32  # fp16 matmuls are slow or missing on CPUs
    model = AutoModel.from_pretrained(path, dtype=dtype)
    model.eval().to(device)
    if spec.modality == "text":
        pre = AutoTokenizer.from_pretrained(path)
    else:
        try:
            from transformers import ViTImageProcessorPil

            pre = ViTImageProcessorPil.from_pretrained(path)
        except ImportError:  # pragma: no cover
            pre = AutoImageProcessor.from_pretrained(path)
    return model, pre
