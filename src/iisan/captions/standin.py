"""The demo's captioner stand-in (`build_captioner_standin`): LLaVA-NeXT's real architecture at a
tiny size with random weights, with the chat templates of the llava-hf checkpoints."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from iisan.io import honour_umask

# Stand-in geometry: the real models tile 336 px inputs on the grid below (scaled by 336 / 32).
STANDIN_TILE = 32
STANDIN_PATCH = 8
STANDIN_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
STANDIN_INIT_STD = 0.2  # wider than a trained model's init so that the image visibly steers the random captions
# Chat templates of the stand-ins, after those of the llava-hf checkpoints: Mistral's [INST]
# turns (llava-v1.6-mistral-7b-hf) and the ChatML turns of llava-v1.6-34b-hf (Yi-34B, a Llama
# architecture). Image slots come first in a user turn, then its text, as in the originals.
CHAT_TEMPLATES = {
    "mistral": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}[INST] "
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        " [/INST]"
        "{% elif message['role'] == 'assistant' %} {{ message['content'][0]['text'] }}</s>"
        "{% endif %}{% endfor %}"
    ),
    "llama": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
TURN_TOKENS = {"mistral": ["[INST]", "[/INST]"], "llama": ["<|im_start|>", "<|im_end|>"]}


def build_captioner_standin(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    seed: int = 0,
    *,
    text_family: str = "mistral",
    vocab_size: int = 2000,
    hidden: int = 64,
    layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
) -> None:
    """Save a random-weight LLaVA-NeXT stand-in to `out_dir` (model, tokenizer, processor with
    `LlavaNextImageProcessorPil`, chat template), loadable offline with ``from_pretrained``.

    The architecture is the real one at a tiny size: a CLIP vision tower on 32 px tiles of
    8 px patches, any-resolution tiling on grid pinpoints up to 96 px, the two-layer projector,
    and a Mistral (GQA, like llava-v1.6-mistral-7b) or Llama (like the Yi-34B of
    llava-v1.6-34b) text model with its chat template. The word-level tokenizer is trained
    offline on `texts` (pass the item titles AND the prompts, or the prompt's words are <unk>),
    plus the special ``<image>`` token and the template's turn tokens. The LM-head rows of all
    special tokens are zero, so the stand-in never emits one: every caption runs to
    ``max_new_tokens`` words of the vocabulary (a random model would otherwise often stop at
    once or emit only image tokens, which decode to nothing)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from iisan.encoders.tokenizers import train_bpe_tokenizer

    if text_family not in CHAT_TEMPLATES:
        raise ValueError(f"text_family {text_family!r}: expected one of {sorted(CHAT_TEMPLATES)}")
    out_dir = Path(out_dir)
    tokenizer = train_bpe_tokenizer(list(texts), vocab_size=vocab_size)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>", *TURN_TOKENS[text_family]]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    text_kwargs = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_config = MistralConfig(**text_kwargs, sliding_window=None) if text_family == "mistral" else LlamaConfig(**text_kwargs)
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=STANDIN_TILE,
        patch_size=STANDIN_PATCH,
        projection_dim=vision_hidden,
    )
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_grid_pinpoints=STANDIN_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(STANDIN_TILE // STANDIN_PATCH) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * STANDIN_INIT_STD)
        model.lm_head.weight[tokenizer.all_special_ids] = 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": STANDIN_TILE},
        crop_size={"height": STANDIN_TILE, "width": STANDIN_TILE},
        image_grid_pinpoints=STANDIN_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=STANDIN_PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATES[text_family],
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    honour_umask(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
