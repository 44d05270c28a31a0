"""InternVL (``InternVLForConditionalGeneration`` / ``InternVLModel``, transformers' "-hf" checkpoints:
InternVL2.5, InternVL3): an InternViT tower with a CLS token, 2x2 pixel shuffle, an MLP projector
and a Qwen2- or Llama-shaped language model.

- Visual tokens: every ``<IMG_CONTEXT>`` placeholder (``image_token_id``). An image is cut into
  dynamic tiles (plus a thumbnail when there are several), each giving ``image_seq_length``
  placeholders, all in one run between ``<img>`` and ``</img>``; those two are text tokens and
  never dropped. Video frames use the same placeholders (one ``<img>`` run per frame).
- Positions and mask: 1-D rotary positions and a causal mask, as the defaults.
- ``vistrim show``: the thumbnail on the left, the tiles in their grid on the right, one cell per
  token (2x2 patches); the inputs do not carry the grid, so it is the GotOcr2 image processor's
  own choice for the original image's size, checked against the tile count (refused otherwise).
- Vision stage: refused. The projector reads a pixel shuffle of the whole square patch grid of
  each tile (2x2 neighbours folded into one token), which a window merge inside the tower breaks,
  and the tower's layers take no attention mask to run tiles that keep different numbers of tokens.
- FLOPs: decoder only (the tiles per image and the shuffled projector are not in bench's formulas).
"""

from __future__ import annotations

from ..errors import VistrimError
from .base import Family, TokenCells, register
from .tiles import got_ocr2_cells, shuffled_cells

PLACEHOLDERS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'video' %}<video>\n"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register
class InternVL(Family):
    name = "internvl"
    model_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    videos = True  # frames are image placeholders, trimmed like images
    vision_refusal = (
        "its projector reads a 2x2 pixel shuffle of each tile's full patch grid and its tower layers "
        "take no attention mask; set vision=false"
    )

    def token_cells(self, inputs: dict, image: int, *, processor=None, image_size=None) -> TokenCells:
        """The image's tiles are ``pixel_values`` entries in prompt order, the thumbnail last when
        there are several; their grid is the GotOcr2 image processor's own choice for the image's
        size (``processor``, ``image_size``), checked against the tile count. A tile's tokens are
        its patch grid through the core's ``pixel_shuffle`` (run on an index probe, with the
        reshapes of ``get_image_features`` around it): one cell per 2x2 patch block."""
        if inputs.get("pixel_values") is None or inputs.get("pixel_values_videos") is not None:
            raise VistrimError(f"{self.name}: token cells are known for image-only prompts")
        vision = self.config.vision_config
        size, patch = _pair(vision.image_size), _pair(vision.patch_size)
        if (
            size[0] != size[1]
            or patch[0] != patch[1]
            or self.config.vision_feature_select_strategy != "default"
        ):
            raise VistrimError(f"{self.name}: token cells are known for square tiles without a CLS feature")
        side, ratio = size[0] // patch[0], self.config.downsample_ratio
        scale = round(1 / ratio)

        def shuffle(x):
            folded = self.core.pixel_shuffle(x.reshape(1, side, side, -1), scale_factor=ratio)
            return folded.reshape(1, -1, folded.shape[-1])

        local = shuffled_cells(self.name, shuffle, side, scale)
        return got_ocr2_cells(
            self, inputs, image, processor, image_size, local, side // scale, patch[0] * scale, "thumbnail"
        )

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa", *, text: str = "qwen2"):
        """InternVL with a Qwen2 (``text="qwen2"``, q/k/v bias) or Llama language model: 4 decoder
        layers (GQA 4/2), a 2-layer tower on 32x32 tiles with patch 4 (8x8 patches + CLS), 2x2
        pixel shuffle, so a tile gives 16 tokens; images are cut into up to 4 tiles + a thumbnail."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        from ..models.processors import image_only
        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        tile, patch, ratio = 32, 4, 0.5
        seq = int((tile // patch) ** 2 * ratio**2)
        tokenizer = word_level_tokenizer(
            _WORDS,
            PLACEHOLDERS,
            {
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
        )
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=4
        )
        processor = image_only(
            InternVLProcessor,
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_length=seq,
            chat_template=CHAT_TEMPLATE,
        )
        text_config = tiny_text(tokenizer, model_type=text)
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=tile,
            patch_size=patch,
            initializer_range=0.08,
        )
        config = InternVLConfig(
            text_config=text_config,
            vision_config=vision,
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=seq,
            downsample_ratio=ratio,
        )
        return seeded(
            InternVLForConditionalGeneration, config, seed, attn_implementation, tokenizer
        ), processor

    @classmethod
    def tiny_variants(cls):
        return {
            "internvl": cls.tiny,
            "internvl_llama": lambda seed=0, attn_implementation="sdpa": cls.tiny(
                seed, attn_implementation, text="llama"
            ),
        }


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
