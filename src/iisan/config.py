"""Typed configuration: the settings of one experiment, built once from the workflow's config.

Defaults live in one place each: a field of the dataclasses below (model, training, fine-tuning,
speed) has its default here and nowhere else (the config schema lists these fields without
defaults); every other config key has its default in `config/schemas/config.schema.yaml`, which
`iisan.pipeline.workflow.validate` fills in. `Experiment.from_config` is the only code that reads the
config's training and model sections.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml

from iisan.training import methods


def typed(value: Any) -> Any:
    """Read a `--config key=value` value the way a config file would be read.

    Snakemake turns `--config` values into ints or floats, but leaves `true`, `[1, 2]` and the
    leaves of `{max_epochs: 3}` as strings. Strings are read as YAML here (with Python's float
    syntax too, so `1e-4` is a number); lists and mappings are read element by element.
    """
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
        return typed(parsed) if isinstance(parsed, list | dict) else parsed
    if isinstance(value, list | tuple):
        return [typed(v) for v in value]
    if hasattr(value, "items"):
        return {k: typed(v) for k, v in value.items()}
    return value


@dataclass
class ModelConfig:
    method: str = "iisan"  # a name of the method registry (iisan.training.methods): what the model is made of
    heads: str = "vs"  # vs: F=Linear(d,d), P=Linear(d,64); va: F=Linear(d,64), P=Linear(64,64)
    bottleneck: int = 64  # r of the SANBs of the text (field 0) tower, and of the others unless set below
    bottleneck_image: int | None = None  # r of the image (field 1) intra tower; None: bottleneck
    # r of the inter tower; None: the authors' rule, the image tower's r when the text is wider,
    # else the text tower's (Code_Cached_Asym/model/model.py; docs/method.md §4)
    bottleneck_inter: int | None = None
    embed_dim: int = 64  # D
    gate_temperature: float = 0.1
    max_len: int = 10  # T
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.1

    def bottlenecks(self, dims: list[int]) -> tuple[list[int], int]:
        """(r of each field's intra tower, r of the inter tower) for towers of widths `dims`."""
        rs = [self.bottleneck, self.bottleneck if self.bottleneck_image is None else self.bottleneck_image][: len(dims)]
        if not rs:  # ID models: no towers
            return rs, self.bottleneck
        if self.bottleneck_inter is not None:
            return rs, self.bottleneck_inter
        return rs, rs[1 if len(dims) == 2 and dims[0] > dims[1] else 0]


PRECISIONS = ("bf16", "fp16", "fp32")  # train.precision (the config schema's enum is filled from these)
ITEM_SLOTS = ("all", "real", "distinct")  # train.item_slots


@dataclass
class Speed:
    """How fast a run trains, never what it computes: kept out of an experiment's identity, so
    changing one reruns nothing. The training config holds these (`TrainConfig` is a `Speed`);
    a workflow config sets SPEED_FIELDS in its `speed` section; the training step
    (`iisan.training.fast_step`) and the Trainer read them."""

    cuda_graphs: bool = True  # capture the whole training step as one CUDA graph (CUDA only)
    compile: bool = False  # torch.compile the item and user encoders, and backbone layers in the loop
    eval_batch: int = 1024  # users per evaluation chunk
    # write the fit checkpoint after an epoch only once this many seconds have passed since the
    # last one (a 0.7 s cached epoch would spend a third of its time saving 60 MB)
    checkpoint_every_s: float = 0.0
    # experiments of benchmarks/ and tests (not config keys):
    compile_backend: str = "inductor"  # inductor compiles on CUDA with triton only, other backends anywhere
    compile_forward: bool = False  # the whole forward, loss included, compiled as one (with `compile`)
    graph_backbones: bool = False  # trainable backbones inside the CUDA graph too (fixed shapes: item_slots all)
    layer_mode: str | None = None  # torch.compile mode of each backbone layer (with `compile`)


# the Speed fields a workflow config sets (its `speed` section)
SPEED_FIELDS = ("cuda_graphs", "compile", "eval_batch", "checkpoint_every_s")


@dataclass
class TrainConfig(Speed):
    """Every setting of a training run: what changes its result (the fields below) and its
    speed (the `Speed` fields)."""

    batch_size: int = 64
    max_epochs: int = 100
    patience: int = 11
    lr_main: float = 2e-4
    lr_san: float = 1e-4
    lr_text_f: float = 5e-5
    lr_image_f: float = 1e-4  # the image head's F (the authors' image fine-tuning rate)
    seed: int = 12345
    # mixed precision on CUDA (a CPU computes in fp32): bf16 autocast for training and the
    # encoders at evaluation; fp16 autocast with a GradScaler for training and fp32 evaluation
    # (the authors'); fp32. Evaluation ranks in fp32 either way.
    precision: str = "bf16"
    k: int = 10
    # uncached baselines (the authors' scripts): pretrained backbone tensors (FFT's weights,
    # BitFit's biases) and inserted adapter/LoRA tensors, text and image backbone
    lr_backbone_text: float = 5e-5
    lr_backbone_image: float = 1e-4
    lr_peft_text: float = 4e-4
    lr_peft_image: float = 4e-4
    # backbones in the loop: run every item slot of a batch (the authors' code), every slot that
    # holds an item (padding skipped: the same model), or each distinct item once (repeats share a
    # dropout mask); see BackboneFeatures.gather
    item_slots: str = "all"

    def __post_init__(self):
        if self.item_slots not in ITEM_SLOTS:
            raise ValueError(f"train.item_slots: {self.item_slots!r} is not one of {', '.join(ITEM_SLOTS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def result_settings(self) -> dict:
        """The fields that change a run's result: every field but the `Speed` ones."""
        speed = {f.name for f in fields(Speed)}
        return {k: v for k, v in asdict(self).items() if k not in speed}


# ModelConfig fields whose None (the default) is left out of an experiment's identity
OPTIONAL_MODEL_FIELDS = ("bottleneck_image", "bottleneck_inter")


@dataclass
class FinetuneConfig:
    """Modules the embedded fine-tuning baselines insert into a backbone (docs/method.md §8)."""

    adapter_bottleneck: int = 64
    lora_rank: int = 8
    lora_alpha: int = 1  # scaling alpha / rank = 1/8: loralib's default alpha in the authors' code


@dataclass
class TowerConfig:
    """One item field and the backbone that reads it (its registry entry as configured)."""

    field: str
    backbone: str
    spec: dict  # the backbone's registry entry, less what only labels plots (group, params_b)

    LABEL_ONLY = ("group", "params_b")

    @classmethod
    def from_config(cls, config: dict, field: str, backbone: str, where: str) -> TowerConfig:
        from iisan.data import ITEM_FIELDS

        if field not in ITEM_FIELDS:
            raise ValueError(f"{where}: unknown item field {field!r} (item fields: {', '.join(ITEM_FIELDS)})")
        entry = backbone_entry(config, backbone, where)
        if ITEM_FIELDS[field] != entry["modality"]:
            raise ValueError(f"{where}: field {field!r} holds {ITEM_FIELDS[field]}, but backbone {backbone!r} is a "
                             f"{entry['modality']} backbone")
        return cls(field, backbone, {k: v for k, v in entry.items() if k not in cls.LABEL_ONLY})

    def backbone_spec(self):
        from iisan.encoders.backbones import BackboneSpec

        return BackboneSpec.from_config(self.backbone, self.spec)


def backbone_entry(config: dict, name: str, where: str | None = None) -> dict:
    """The registry entry of backbone `name`; an unknown name raises ValueError (prefixed with
    `where`, the config key that names it)."""
    try:
        return config["backbones"][name]
    except KeyError:
        raise ValueError(f"{where + ': ' if where else ''}backbone {name!r} is not in the backbones registry of the config "
                         f"(known: {', '.join(sorted(config['backbones'])) or 'none'})") from None


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**values)


@dataclass
class Experiment:
    """One run: dataset x towers x method x LayerDrop scheme x cache x seed, with every setting
    that changes its result. `to_dict()` is its identity: the workflow passes it to the training
    job (a change reruns exactly the runs it touches) and `hash()` names it in checkpoints."""

    dataset: str
    towers: list[TowerConfig]
    method: str
    scheme: str
    cache: str  # dropped | full | none (backbones in the training loop)
    include_h0: bool
    cache_dtype: str | None  # config key cache.dtype (auto | float16 | float32; BackboneSpec.cache_dtype)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        m = methods.check_cache(self.method, self.cache)
        if m.is_id and self.towers:
            raise ValueError(f"method {self.method!r} is ID-based: it takes no towers")
        if not m.is_id and not 1 <= len(self.towers) <= 2:
            raise ValueError(f"method {self.method!r} needs 1 or 2 towers, got {len(self.towers)}")

    @property
    def spec(self) -> methods.Method:
        return methods.get(self.method)

    @classmethod
    def from_config(cls, config: dict, dataset: str, towers: list[TowerConfig], method: str, scheme: str,
                    cache: str, seed: int) -> Experiment:
        """train <- decoder_train (runs whose text tower is a decoder LLM) <- dataset_train[dataset]
        <- method_train[method], then the seed; model <- dataset_model[dataset] <- the method's
        heads."""
        from iisan.encoders.backbones import DECODERS

        m = methods.get(method)
        train = dict(config.get("train") or {})
        if any(t.spec["modality"] == "text" and t.spec["family"] in DECODERS for t in towers):
            train.update(config.get("decoder_train") or {})
        train.update((config.get("dataset_train") or {}).get(dataset) or {})
        train.update((config.get("method_train") or {}).get(method) or {})
        train["seed"] = int(seed)
        model = dict(config.get("model") or {}, method=method)
        model.update((config.get("dataset_model") or {}).get(dataset) or {})
        if m.heads:
            model["heads"] = m.heads
        return cls(
            dataset=dataset, towers=list(towers), method=method, scheme=scheme, cache=cache,
            include_h0=config["include_h0"], cache_dtype=None if m.is_id else config["cache"]["dtype"],
            model=_build(ModelConfig, model, f"config key model (or dataset_model.{dataset})"),
            train=_build(TrainConfig, train, f"training config of {method}"),
            finetune=_build(FinetuneConfig, dict(config.get("finetune") or {}), "config key finetune"),
        )

    def to_dict(self) -> dict:
        """Everything that changes the result (the speed fields of `train` left out; so are the
        model fields left at None, the per-tower bottlenecks, so that adding them kept the
        identity of every run that does not set them)."""
        model = {k: v for k, v in asdict(self.model).items() if v is not None or k not in OPTIONAL_MODEL_FIELDS}
        return dict(asdict(self), model=model, train=self.train.result_settings())

    @classmethod
    def from_dict(cls, d: dict) -> Experiment:
        d = dict(d)
        return cls(
            **{k: v for k, v in d.items() if k not in ("towers", "model", "train", "finetune")},
            towers=[TowerConfig(**t) for t in d["towers"]],
            model=_build(ModelConfig, d["model"], "experiment model"),
            train=_build(TrainConfig, d["train"], "experiment train"),
            finetune=_build(FinetuneConfig, d.get("finetune", {}), "experiment finetune"),
        )

    def with_speed(self, speed: dict | None) -> Experiment:
        """This experiment at a workflow config's speed settings (its `speed` section)."""
        unknown = set(speed or {}) - set(SPEED_FIELDS)
        if unknown:
            raise ValueError(f"speed: unknown keys {sorted(unknown)} (known: {', '.join(SPEED_FIELDS)})")
        return replace(self, train=replace(self.train, **(speed or {})))

    def hash(self) -> str:
        return config_hash(self.to_dict())

    def tower_layers(self, tower: int) -> list[int]:
        """Indices into the cached states (h[0..L], then the output) that tower `tower` feeds the
        item encoder."""
        from iisan.encoders.backbones import output_layer
        from iisan.training.layerdrop import scheme_layers, tower_schemes

        spec = self.towers[tower].spec
        layers = spec["layers"]
        if self.spec.reads_last:
            return scheme_layers("last", layers, output=output_layer(spec["family"], layers))
        schemes = tower_schemes(self.scheme, len(self.towers))
        return scheme_layers(schemes[tower], layers, include_h0=self.include_h0)


def config_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
