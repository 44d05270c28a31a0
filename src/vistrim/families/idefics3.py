"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` / ``Idefics3Model``,
``SmolVLMForConditionalGeneration`` / ``SmolVLMModel``): a SigLIP-like tower without CLS token, a
connector that pixel-shuffles each tile's patch grid and projects it, and a Llama-shaped language
model at ``model.text_model``.

- Visual tokens: every ``<image>`` placeholder (``image_token_id``). An image is split into tiles
  plus a global (downscaled) image, ``image_seq_len`` placeholders each; every tile is wrapped in
  boundary tokens (``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``, newlines),
  which are text tokens: never dropped. SmolVLM's video frames enter the same way (one global image
  each, with a timestamp in text).
- Positions and mask: 1-D rotary positions and a causal mask, as the defaults.
- Vision stage: refused. The connector reads a pixel shuffle of each tile's full patch grid
  (``scale_factor`` x ``scale_factor`` neighbours folded into one token), which a window merge
  inside the tower breaks.
- FLOPs: decoder only (tiles per image and the shuffled connector are not in bench's formulas).
"""

from __future__ import annotations

from .base import Family, register

ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
PLACEHOLDERS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *ROW_COL)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register
class Idefics3(Family):
    name = "idefics3"
    model_classes = (
        "Idefics3ForConditionalGeneration",
        "Idefics3Model",
        "SmolVLMForConditionalGeneration",
        "SmolVLMModel",
    )
    videos = True  # SmolVLM: frames enter as images (image placeholders), trimmed like images
    vision_refusal = (
        "its connector reads a pixel shuffle of each tile's full patch grid, which a window merge "
        "breaks; set vision=false"
    )

    def language_model(self):
        return self.core.text_model

    def vision_sequences(self, inputs: dict) -> int:
        """Tiles and global images the tower runs: pixel_values (B, images, C, H, W) is padded with
        all-zero images, which the model skips."""
        pixels = inputs.get("pixel_values")
        return 0 if pixels is None else int((pixels != 0).flatten(2).any(-1).sum())

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa", *, smolvlm: bool = False):
        """Idefics3 (or SmolVLM with ``smolvlm=True``): 4 Llama decoder layers (GQA 4/2), a 2-layer
        tower on 24x24 tiles with patch 4 (6x6 patches), 2x2 pixel shuffle, so each tile and the
        global image give 9 tokens; images are resized to 72 pixels on their longest edge and split
        into up to 3x3 tiles (a square image: 9 tiles + the global one, 90 tokens).

        Both use ``Idefics3Processor``: SmolVLM's own processor builds the same image prompt
        strings but needs the ``num2words`` package (and a video processor for chat templates)."""
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3Processor,
            SmolVLMConfig,
            SmolVLMForConditionalGeneration,
        )

        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        if smolvlm:
            from transformers.models.smolvlm.image_processing_pil_smolvlm import (
                SmolVLMImageProcessorPil as ImageProcessor,
            )

            config_cls, model_cls = SmolVLMConfig, SmolVLMForConditionalGeneration
        else:
            from transformers.models.idefics3.image_processing_pil_idefics3 import (
                Idefics3ImageProcessorPil as ImageProcessor,
            )

            config_cls, model_cls = Idefics3Config, Idefics3ForConditionalGeneration
        tile, patch, scale = 24, 4, 2
        seq = (tile // patch) ** 2 // scale**2
        tokenizer = word_level_tokenizer(_WORDS, PLACEHOLDERS, {"fake_image_token": PLACEHOLDERS[0]})
        image_processor = ImageProcessor(
            size={"longest_edge": 3 * tile}, max_image_size={"longest_edge": tile}
        )
        processor = Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=seq,
            chat_template=CHAT_TEMPLATE,
        )
        text = tiny_text(tokenizer, model_type="llama")
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=tile,
            patch_size=patch,
            initializer_range=0.08,
        )
        config = config_cls(
            text_config=text,
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=scale,
            pad_token_id=tokenizer.pad_token_id,
        )
        return seeded(model_cls, config, seed, attn_implementation, tokenizer), processor

    @classmethod
    def tiny_variants(cls):
        return {
            "idefics3": cls.tiny,
            "smolvlm": lambda seed=0, attn_implementation="sdpa": cls.tiny(
                seed, attn_implementation, smolvlm=True
            ),
        }
