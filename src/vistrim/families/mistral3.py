"""Mistral 3 (``Mistral3ForConditionalGeneration`` / ``Mistral3Model``: Mistral-Small-3.1/3.2): a
Pixtral tower (2-D rotary positions, any image size), a 2x2 patch merger in the projector and a
Mistral language model.

- Visual tokens: every ``[IMG]`` placeholder (``image_token_index``), one per merged 2x2 patch
  cell; each row of an image ends in ``[IMG_BREAK]`` and the image in ``[IMG_END]``: text tokens,
  never dropped (so an image is several runs of placeholders, one per row).
- Positions and mask: 1-D rotary positions and a causal mask, as the defaults.
- Refused at ``trim()``: a sliding window (``sliding_window`` set, the base check), and language
  models that scale queries by position (Ministral 3's ``llama_4_scaling_beta``: the runtime
  rebuilds query rows from ``q_proj`` and rotary embeddings only).
- Vision stage: refused. The tower attends over the patches of every image packed into one
  sequence (a block mask per image) and the projector merges 2x2 patch cells of each image's grid,
  which a window merge breaks.
- FLOPs: decoder only (images of any size and the patch merger are not in bench's formulas).
"""

from __future__ import annotations

from ..errors import VistrimError
from .base import Family, register

PLACEHOLDERS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register
class Mistral3(Family):
    name = "mistral3"
    model_classes = ("Mistral3ForConditionalGeneration", "Mistral3Model")
    tiny_requires = ("torchvision",)  # transformers' PixtralProcessor imports it
    vision_refusal = (
        "its tower attends over the patches of every image packed into one sequence and the "
        "projector merges 2x2 cells of each image's patch grid; set vision=false"
    )

    def check(self) -> None:
        super().check()
        rope = getattr(self.text_config, "rope_parameters", None) or {}
        if rope.get("llama_4_scaling_beta"):
            raise VistrimError(
                f"{self.name}: a language model that scales queries by position (llama_4_scaling_beta, "
                f"{self.text_config.model_type}) is not supported"
            )

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """4 Mistral decoder layers (GQA 4/2, no sliding window), a 2-layer Pixtral tower with patch 4
        and a 2x2 merger: an image resized to at most 32 pixels gives up to 4x4 tokens, one
        ``[IMG_BREAK]`` per row."""
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralProcessor
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        patch, merge, longest = 4, 2, 32
        tokenizer = word_level_tokenizer(_WORDS, PLACEHOLDERS, {"image_token": "[IMG]"})
        image_processor = PixtralImageProcessorPil(
            size={"longest_edge": longest}, patch_size={"height": patch, "width": patch}
        )
        processor = PixtralProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            spatial_merge_size=merge,
            chat_template=CHAT_TEMPLATE,
        )
        text = tiny_text(tokenizer, model_type="mistral", head_dim=16, sliding_window=None)
        vision = dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=longest,
            patch_size=patch,
            initializer_range=0.08,
        )
        config = Mistral3Config(
            text_config=text,
            vision_config=vision,
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=merge,
            vision_feature_layer=-1,
        )
        return seeded(
            Mistral3ForConditionalGeneration, config, seed, attn_implementation, tokenizer
        ), processor
