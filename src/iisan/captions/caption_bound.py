"""What a LLaVA-NeXT captioner can do at best on a card, from its shapes alone: the hardware
bound of one item's prefill and decode, and the largest batch the card's memory holds.

Prefill is compute-bound: the vision tower on every tile, the projector, and the language
model's layers on every prompt token (2 FLOPs per weight per token, plus causal attention),
at a matmul rate. Decode is memory-bound: each step reads the language model's weights once
(the embedding table only for the batch's rows, left out) and every sequence's live KV cache
(layers x 2 x kv_heads x head_dim x bytes per token of prompt and tokens so far), at a memory
bandwidth. Both rates are measured ones (`benchmarks/caption_speed.py` measures them beside
the timings it compares with this bound).

The memory plan counts the weights, the KV cache of the longest prompt plus the new tokens, and
the prefill's activations, which peak at about `ACTIVATION_INTERMEDIATES` MLP-wide tensors per
prompt token (fit to peaks measured on an H200 with the 7B model, covers and three-frame videos,
batches 8 to 32, dynamic and static caches; docs/benchmarks-history.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTIVATION_INTERMEDIATES = 4.5  # prefill activations: MLP-wide tensors (intermediate x bytes) per prompt token
RESERVE_BYTES = 2 * 2**30  # CUDA context and CUDA-graph pools, kept free by `largest_batch`
# and this share of the memory for the allocator's fragmentation between prompt shapes: on an H100
# the plan was within 2 % of the measured peak at batch 16, yet its larger batch ran out of memory
RESERVE_SHARE = 0.10


def reserve_bytes(memory: float) -> float:
    """What `largest_batch` keeps free of `memory` bytes."""
    return RESERVE_BYTES + RESERVE_SHARE * memory


@dataclass(frozen=True)
class CaptionerShapes:
    """The shapes that cost: a decoder-only language model (with grouped-query attention when
    `kv_heads` < `heads`) behind a CLIP vision tower on `vision_tile`-pixel tiles of
    `vision_patch`-pixel patches and LLaVA's two-layer projector."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_tile: int = 336
    vision_patch: int = 14
    head_dim: int | None = None  # hidden // heads when None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o projections, the gated MLP, two RMS norms."""
        attn = self.hidden * self.hd * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def decode_params(self) -> int:
        """Weights every decode step reads: the layers, the final norm and the LM head."""
        return self.layers * self.layer_params + self.hidden + self.vocab * self.hidden

    @property
    def vision_tokens_per_tile(self) -> int:
        return (self.vision_tile // self.vision_patch) ** 2 + 1  # patches + CLS

    @property
    def vision_params(self) -> int:
        """CLIP vision tower: patch embedding, class and position embeddings, two LayerNorms
        around `vision_layers` blocks (attention and MLP with biases, two LayerNorms)."""
        h, i = self.vision_hidden, self.vision_intermediate
        block = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        embed = 3 * self.vision_patch**2 * h + h + self.vision_tokens_per_tile * h
        return embed + 4 * h + self.vision_layers * block

    @property
    def projector_params(self) -> int:
        """Two linear layers with biases, and the image-newline vector."""
        return self.vision_hidden * self.hidden + self.hidden + self.hidden * self.hidden + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.vision_params + self.projector_params + self.vocab * self.hidden + self.decode_params

    def kv_bytes_per_token(self, elem: int = 2) -> int:
        return self.layers * 2 * self.kv_heads * self.hd * elem

    def prefill_flops(self, prompt_tokens: int, tiles: int) -> float:
        """Matmul FLOPs of one item's prefill: the vision tower on every tile (all its layers run),
        the projector on the prompt's tokens (an upper bound: only image tokens go through it),
        the layers on every prompt token with causal attention (QK^T and AV: 2 T^2 d per layer),
        and the LM head on the last token."""
        vt = self.vision_tokens_per_tile
        vision_linear = self.vision_params - vt * self.vision_hidden - self.vision_hidden
        vision = tiles * (2 * vision_linear * vt + 4 * self.vision_layers * vt**2 * self.vision_hidden)
        lm = 2 * self.layers * self.layer_params * prompt_tokens + 2 * self.layers * prompt_tokens**2 * self.heads * self.hd
        return vision + 2 * self.projector_params * prompt_tokens + lm + 2 * self.vocab * self.hidden

    def decode_step_bytes(self, live_tokens: float, elem: int = 2) -> float:
        """Bytes one decode step must read: the weights once, and the KV cache of `live_tokens`
        tokens summed over the batch's sequences."""
        return self.decode_params * elem + self.kv_bytes_per_token(elem) * live_tokens


def shapes_from_config(config) -> CaptionerShapes:
    """`CaptionerShapes` of a LLaVA-NeXT config (`model.config` or `LlavaNextConfig.from_pretrained`)."""
    t, v = config.text_config, config.vision_config
    head_dim = getattr(t, "head_dim", None)
    return CaptionerShapes(
        hidden=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
        kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads, intermediate=t.intermediate_size,
        vocab=t.vocab_size, vision_hidden=v.hidden_size, vision_intermediate=v.intermediate_size,
        vision_layers=v.num_hidden_layers, vision_tile=v.image_size, vision_patch=v.patch_size,
        head_dim=None if head_dim in (None, t.hidden_size // t.num_attention_heads) else head_dim,
    )


@dataclass(frozen=True)
class Bound:
    """Seconds per item at best: prefill (compute) and decode (memory), and one decode step of the batch."""

    prefill_s: float
    decode_s: float
    step_s: float

    @property
    def item_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def items_per_s(self) -> float:
        return 1 / self.item_s


def caption_bound(shapes: CaptionerShapes, *, prompt_tokens: float, tiles: float, new_tokens: int, batch: int,
                  tflops: float, bandwidth_gbs: float, elem: int = 2) -> Bound:
    """The bound of captioning items of `prompt_tokens` tokens (image tokens included) from
    `tiles` vision tiles each, `new_tokens` new tokens each, `batch` at a time, at a matmul
    rate of `tflops` and a memory bandwidth of `bandwidth_gbs` (bytes read per second / 1e9).
    A decode step's live length is the prompt plus the tokens so far, on average
    (new_tokens + 1) / 2."""
    if batch < 1 or new_tokens < 1:
        raise ValueError(f"batch {batch} and new_tokens {new_tokens} must be at least 1")
    prefill = shapes.prefill_flops(prompt_tokens, tiles) / (tflops * 1e12)
    live = batch * (prompt_tokens + (new_tokens + 1) / 2)
    step = shapes.decode_step_bytes(live, elem) / (bandwidth_gbs * 1e9)
    return Bound(prefill_s=prefill, decode_s=step * new_tokens / batch, step_s=step)


def memory_bytes(shapes: CaptionerShapes, *, batch: int, prompt_tokens: int, new_tokens: int, elem: int = 2,
                 weights: bool = True) -> float:
    """Peak GPU memory of a batch whose longest prompt has `prompt_tokens` tokens: the weights
    (unless `weights` is False: already loaded), the KV cache of prompt + new tokens for every
    sequence, and the prefill's activations."""
    kv = shapes.kv_bytes_per_token(elem) * (prompt_tokens + new_tokens) * batch
    act = ACTIVATION_INTERMEDIATES * shapes.intermediate * elem * prompt_tokens * batch
    return (shapes.params * elem if weights else 0) + kv + act


def largest_batch(shapes: CaptionerShapes, *, prompt_tokens: int, new_tokens: int, memory: float, elem: int = 2,
                  weights: bool = True, reserve: float | None = None, cap: int | None = None) -> int:
    """The largest batch whose `memory_bytes` fits `memory` bytes less `reserve` (default
    `reserve_bytes`): a card's
    total with `weights`, or the free memory after loading the model without; at most `cap`.
    Raises ValueError when not even one item fits."""
    fixed = memory_bytes(shapes, batch=0, prompt_tokens=prompt_tokens, new_tokens=new_tokens, elem=elem, weights=weights)
    per_item = memory_bytes(shapes, batch=1, prompt_tokens=prompt_tokens, new_tokens=new_tokens, elem=elem, weights=False)
    reserve = reserve_bytes(memory) if reserve is None else reserve
    batch = math.floor((memory - reserve - fixed) / per_item)
    if batch < 1:
        raise ValueError(f"one item of {prompt_tokens} prompt + {new_tokens} new tokens needs {(fixed + per_item + reserve) / 2**30:.1f} GiB "
                         f"with {'the weights and ' if weights else ''}the reserve; {memory / 2**30:.1f} GiB are available")
    return min(batch, cap) if cap else batch


# The llava-hf checkpoints' shapes (config.json of each).
LLAVA_NEXT_MISTRAL_7B = CaptionerShapes(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32064)
LLAVA_NEXT_34B = CaptionerShapes(hidden=7168, layers=60, heads=56, kv_heads=8, intermediate=20480, vocab=64064)
