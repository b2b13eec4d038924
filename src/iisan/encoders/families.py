"""The backbone-family registry: every ``family`` a backbone registry entry may name, defined once.

A family says which modality it encodes, how the workflow builds its stand-in (a randomly
initialised model of the entry's shape with its tokenizer or image processor), whether it is a
decoder LLM, which state is its output, whether its model class builds a pooler, its default
pooling, how the embedded fine-tuning baselines reach into it (the modules adapters follow, the
modules LoRA adapts, the parameters off the computation path) and how many bytes a parameter of
its published weights takes on disk. `iisan.encoders.backbones` (entries, stand-ins, loading; its
`FAMILIES`, `DECODERS` and `OUTPUT_NORM` are views of this registry, which the config schema and
checks read), `iisan.encoders.finetune` and `iisan.encoders.models_fetch` read it from here. Adding a family is
one `register(Family(...))` call (with a stand-in builder when demo entries use it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iisan.registry import Registry

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class Family:
    name: str
    modality: str  # text | image
    # standin(spec, folder, titles) -> model: a random-weight model of the entry's shape (spec: its
    # iisan.encoders.backbones.BackboneSpec, which reads this registry), its
    # tokenizer or image processor saved into `folder` (the model is saved by the caller); the
    # tokenizer is trained on `titles`. None: the family has no stand-in
    standin: Callable[[Any, Path, list[str]], Any] | None = None
    # a decoder LLM: titles get BOS and are padded with id 0 (mean pooling: to max_tokens without a
    # mask, else to the batch's longest; iisan.encoders.item_inputs.encode_texts); caches record the BOS
    decoder: bool = False
    # its output (`last_hidden_state`) is a final norm after h[L] that `output_hidden_states` does
    # not list (ViT's `layernorm`): the cache stores it as one more state
    output_norm: bool = False
    pooler: bool = False  # its model class builds a pooler unless `add_pooling_layer=False` (never read)
    pooling: str = "cls"  # pooling of an entry that sets none
    adapter: tuple[str, ...] = ()  # regexes of the modules the adapters follow (none: no adapters)
    lora: tuple[str, ...] = ()  # module-name suffixes LoRA adapts (peft's target_modules)
    unused: tuple[str, ...] = ()  # parameter-name prefixes off the computation path (FFT and BitFit leave them frozen)
    weight_bytes: int = 2  # bytes per parameter of its published weights (the disk of a fetched model)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"family {self.name}: modality {self.modality!r} is not one of {', '.join(MODALITIES)}")


FAMILIES: Registry[Family] = Registry("family")
register, unregister = FAMILIES.register, FAMILIES.unregister


def get(name: str, where: str = "backbone family") -> Family:
    return FAMILIES.lookup(name, where)


class Modalities(Mapping):
    """Family name -> modality, of the registered families (a live view)."""

    def __getitem__(self, name: str) -> str:
        return FAMILIES[name].modality

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)


class Having(Set):
    """The names of the registered families whose `attribute` is true (a live view)."""

    def __init__(self, attribute: str):
        self.attribute = attribute

    def __contains__(self, name) -> bool:
        family = FAMILIES.get(name)
        return family is not None and bool(getattr(family, self.attribute))

    def __iter__(self) -> Iterator[str]:
        return (n for n, f in FAMILIES.items() if getattr(f, self.attribute))

    def __len__(self) -> int:
        return sum(1 for _ in self)


# --- stand-ins --------------------------------------------------------------------------------
def _init(spec: Any) -> float:
    return float(spec.extra.get("initializer_range", 0.02))


def _vocab(spec: Any) -> int:
    return int(spec.extra.get("vocab_size", 2000))


def bert_standin(spec: Any, folder: Path, titles: list[str]):
    """BERT without its pooler, with a WordPiece tokenizer of the titles."""
    from transformers import BertConfig, BertModel

    from iisan.encoders.tokenizers import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(titles, vocab_size=_vocab(spec))
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=4 * spec.hidden,
        max_position_embeddings=max(64, spec.max_tokens),
        initializer_range=_init(spec),
    )
    model = BertModel(cfg, add_pooling_layer=False)
    tokenizer.save_pretrained(folder)
    return model


def vit_standin(spec: Any, folder: Path, titles: list[str]):
    """ViT without its pooler (patches of ``patch_size``, default 8), its image processor scaling
    to ``image_size`` with mean and std 0.5."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        intermediate_size=4 * spec.hidden,
        image_size=spec.image_size,
        patch_size=int(spec.extra.get("patch_size", 8)),
        initializer_range=_init(spec),
    )
    model = ViTModel(cfg, add_pooling_layer=False)
    ViTImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    return model


def decoder_standin(config: Callable[[Any, dict], Any]):
    """A decoder LLM's stand-in: a word-level tokenizer of the titles and the model of
    `config(spec, settings)`, the settings every decoder shares (``intermediate``, ``kv_heads``
    and ``initializer_range`` from the entry; pad 0, BOS 1, EOS 2)."""

    def standin(spec: Any, folder: Path, titles: list[str]):
        from transformers import AutoModel

        from iisan.encoders.tokenizers import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer(titles, vocab_size=_vocab(spec))
        h, heads = spec.hidden, spec.heads
        settings = dict(
            hidden_size=h,
            intermediate_size=int(spec.extra.get("intermediate", 2 * h)),
            num_hidden_layers=spec.layers,
            num_attention_heads=heads,
            num_key_value_heads=int(spec.extra.get("kv_heads", heads)),
            vocab_size=len(tokenizer),
            max_position_embeddings=max(64, spec.max_tokens),
            initializer_range=_init(spec),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = AutoModel.from_config(config(spec, settings))
        tokenizer.save_pretrained(folder)
        return model

    return standin


def _llama(spec, settings):
    from transformers import LlamaConfig

    return LlamaConfig(**settings)


def _mistral(spec, settings):
    from transformers import MistralConfig

    return MistralConfig(**settings, sliding_window=None)


def _gemma(spec, settings):
    from transformers import GemmaConfig

    return GemmaConfig(**settings, head_dim=spec.hidden // spec.heads)


def _mixtral(spec, settings):
    from transformers import MixtralConfig

    return MixtralConfig(**settings, num_local_experts=int(spec.extra.get("experts", 8)),
                         num_experts_per_tok=int(spec.extra.get("experts_per_token", 2)))


# --- fine-tuning targets (iisan.encoders.finetune) ------------------------------------------------------
# Adapters go after these modules of every layer: the attention-output and FFN-output
# projections, for BERT after their dropout (BertAdaptedSelfOutput in the authors' code: dense,
# dropout, adapter, then residual + LayerNorm). ViT in transformers 5 (layers.N.attention.o_proj,
# mlp.fc2) applies one layer-wide dropout, 0 by default: the adapter follows the projection. The
# older spelling (encoder.layer.N.attention.output.dense, output.dense) is listed too.
BERT_ADAPTER = (r"layer\.\d+\.attention\.output\.dropout", r"layer\.\d+\.output\.dropout")
VIT_ADAPTER = (
    r"layers?\.\d+\.attention\.output\.dense", r"encoder\.layers?\.\d+\.output\.dense",
    r"layers\.\d+\.attention\.o_proj", r"layers\.\d+\.mlp\.fc2",
)
# MPNet: the attention block's dropout follows its output projection `attn.o` (not attn.dropout,
# which drops attention probabilities); the FFN's as in BERT
MPNET_ADAPTER = (r"layer\.\d+\.attention\.dropout", r"layer\.\d+\.output\.dropout")
DECODER_ADAPTER = (r"layers\.\d+\.self_attn\.o_proj", r"layers\.\d+\.mlp\.down_proj")
# LoRA on query and value of every layer (peft matches these as module-name suffixes)
ENCODER_LORA = ("query", "value", "q_proj", "v_proj")
DECODER_LORA = ("q_proj", "v_proj")
POOLER = ("pooler.",)  # off the computation path: the item encoder reads the output state

# encoders are published in float32, decoder LLMs in 16 bits
for _f in (
    Family("bert", "text", bert_standin, pooler=True, adapter=BERT_ADAPTER, lora=ENCODER_LORA, unused=POOLER, weight_bytes=4),
    # no stand-in (the config's MPNet is the real all-mpnet-base-v2, from PyPI parts)
    Family("mpnet", "text", None, pooler=True, adapter=MPNET_ADAPTER, lora=("attn.q", "attn.v"), unused=POOLER, weight_bytes=4),
    Family("vit", "image", vit_standin, output_norm=True, pooler=True, adapter=VIT_ADAPTER, lora=ENCODER_LORA, unused=POOLER,
           weight_bytes=4),
    Family("llama", "text", decoder_standin(_llama), decoder=True, adapter=DECODER_ADAPTER, lora=DECODER_LORA),
    Family("mistral", "text", decoder_standin(_mistral), decoder=True, adapter=DECODER_ADAPTER, lora=DECODER_LORA),
    Family("gemma", "text", decoder_standin(_gemma), decoder=True, adapter=DECODER_ADAPTER, lora=DECODER_LORA),
    # no adapter targets
    Family("mixtral", "text", decoder_standin(_mixtral), decoder=True, lora=DECODER_LORA),
):
    register(_f)
