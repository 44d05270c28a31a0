"""GLM-4.1V / GLM-4V (``Glm4vForConditionalGeneration`` / ``Glm4vModel``): Qwen2-VL's geometry with
GLM's language model, so it is the Qwen2-VL family with its own paths and tiny builder.

- Visual tokens: ``<|image|>`` placeholders, t*h*w/4 per image; video frames use the same
  placeholder between ``<|begin_of_video|>``/``<|end_of_video|>`` (``mm_token_type_ids`` tells them
  apart). ``<|begin_of_image|>``/``<|end_of_image|>`` and frame timestamps are text, never dropped.
- Positions: 3-axis mRoPE ids and ``rope_deltas`` kept by the core, folded by the language model
  into ordinary (B, n, d) cos/sin (partial rotary: the layer's own ``apply_rotary_pos_emb`` rotates
  the first part of each head) before its layers: a cut slices them like Qwen2-VL's, new tokens
  continue at text position + ``rope_deltas``; ``positions=renumber`` is refused.
- Decoder layers add post-attention and post-MLP norms, which the runtime never needs (it rebuilds
  queries from ``input_layernorm`` + ``q_proj`` only).
- Vision stage: refused, as for Qwen2-VL (packed patches of every image, a 2x2 merge follows).
"""

from __future__ import annotations

from .base import register
from .qwen2_vl import Qwen2VL

PLACEHOLDERS = (
    "<|image|>",
    "<|video|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif item['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register
class Glm4V(Qwen2VL):
    name = "glm4v"
    model_classes = ("Glm4vForConditionalGeneration", "Glm4vModel")
    vision_refusal = (
        "its tower attends over packed patches of every image and a 2x2 patch merger follows; "
        "set vision=false"
    )

    @classmethod
    def tiny_variants(cls):
        return {cls.name: cls.tiny}

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """4 decoder layers (GQA 4/2, q/k/v bias, half the head rotated), a 2-layer tower with
        patch 4 and a 2x2 merger, so a 32x32 image gives 16 tokens."""
        from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        from ..models.processors import image_only
        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        tokenizer = word_level_tokenizer(
            _WORDS, PLACEHOLDERS, {"image_token": "<|image|>", "video_token": "<|video|>"}
        )
        image_processor = Glm4vImageProcessorPil(
            patch_size=4,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64},
        )
        processor = image_only(
            Glm4vProcessor, image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
        )
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in PLACEHOLDERS}
        text = tiny_text(
            tokenizer,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            image_size=32,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Glm4vConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image|>"],
            video_token_id=ids["<|video|>"],
            image_start_token_id=ids["<|begin_of_image|>"],
            image_end_token_id=ids["<|end_of_image|>"],
            video_start_token_id=ids["<|begin_of_video|>"],
            video_end_token_id=ids["<|end_of_video|>"],
        )
        return seeded(Glm4vForConditionalGeneration, config, seed, attn_implementation, tokenizer), processor
