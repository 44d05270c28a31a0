"""A tiny random LLaVA built from a config in well under a second: the model the tests run on.

It is a stock ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama language model with
grouped-query attention) with a complete processor, so everything that works on it goes through
the same code paths as a real checkpoint. Its weights are random: answers are meaningless, but
logits, caches and token counts are exact, which is what the tests compare.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from .tokenizer import IMAGE_TOKEN, word_level_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_WORDS = (
    "user assistant : ? . , what is in the image picture photo describe color shape a an of "
    "red green blue yellow black white gray circle square triangle rectangle yes no does contain "
    "how many there are it this that left right top bottom big small one two three four"
).split()


def build_processor(image_size: int, patch_size: int, words=_WORDS) -> LlavaProcessor:
    """A LLaVA processor for a CLIP tower with CLS token and the ``default`` feature strategy."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=word_level_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def llava_from_configs(
    processor: LlavaProcessor, vision: CLIPVisionConfig, seed: int, attn_implementation: str, **text
) -> LlavaForConditionalGeneration:
    """A stock LLaVA (CLIP tower, Llama LM with ``text`` settings, LLaVA-1.5 feature selection) whose
    vocabulary and special tokens are the processor's; weights deterministic for ``seed``."""
    tokenizer = processor.tokenizer
    special = {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(vocab_size=len(tokenizer), **special, **text),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return seeded(LlavaForConditionalGeneration, config, seed, attn_implementation, tokenizer)


def tiny_text(tokenizer, **overrides) -> dict:
    """The language-model settings every family's tiny model shares (4 Llama-shaped layers, hidden
    64, grouped-query attention 4/2, the tokenizer's vocabulary and special tokens), plus the
    family's own ``overrides`` (model type, rotary layout, ...)."""
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.08,  # peaked attention: stable rankings under float reordering
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {**settings, **overrides}


def seeded(model_cls, config, seed: int, attn_implementation: str, tokenizer):
    """``model_cls(config)`` with weights deterministic for ``seed``, the tokenizer's special tokens
    in its generation config, in eval mode."""
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model.eval()


def build_tiny(
    seed: int = 0,
    *,
    num_layers: int = 6,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    attn_implementation: str = "sdpa",
    init_range: float = 0.08,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the tiny random LLaVA and its processor; deterministic for a given ``seed``.

    Default geometry: 32x32 images, patch 4 -> 64 visual tokens; 6 decoder layers, 4 query heads
    sharing 2 key/value heads. ``init_range`` is larger than the usual 0.02 so that attention is
    peaked rather than uniform, which makes token rankings stable under float reordering.
    """
    processor = build_processor(image_size, patch_size)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    model = llava_from_configs(
        processor,
        vision,
        seed,
        attn_implementation,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=init_range,
    )
    return model.eval(), processor
