"""Aya Vision (``AyaVisionForConditionalGeneration`` / ``AyaVisionModel``): a SigLIP tower on dynamic
tiles, a pixel-shuffle SwiGLU projector and a Cohere language model.

- Visual tokens: every ``<|IMG_PATCH|>`` placeholder (``image_token_index``). An image is cut
  into tiles plus a global one, each headed by ``TILE_i`` / ``TILE_GLOBAL`` and the whole image
  wrapped in ``<|START_OF_IMG|>`` / ``<|END_OF_IMG|>``: text tokens, never dropped.
- Language model: a Cohere one (``text_config.model_type == "cohere"``: full attention,
  interleaved rotary embeddings, parallel attention and MLP, optional q/k norms) fits the
  defaults. Cohere 2 (the Command R7B architecture, the config's default) is refused at
  ``trim()``: its sliding-window layers alternate with global layers that use no rotary positions.
- ``vistrim show``: every tile is a run of placeholders; the runs up to ``<|END_OF_IMG|>`` form
  the image (``image_index``, through the processor's tokenizer). The global tile on the left,
  the tiles in their grid on the right, one cell per token (``downsample_factor``-square patch
  blocks); the grid is the GotOcr2 image processor's own choice for the original image's size,
  checked against the tile count (refused otherwise).
- Vision stage: refused. The projector reads a pixel shuffle of each tile's full patch grid,
  which a window merge inside the tower breaks.
- FLOPs: decoder only (tiles per image and the shuffled projector are not in bench's formulas).
"""

from __future__ import annotations

import torch

from ..errors import VistrimError
from .base import Family, Layout, TokenCells, register
from .tiles import got_ocr2_cells, group_runs, shuffled_cells

TILES = tuple(f"TILE_{i}" for i in range(1, 13))
PLACEHOLDERS = (
    "<|IMG_PATCH|>",
    "<|START_OF_IMG|>",
    "<|END_OF_IMG|>",
    "<|IMG_LINE_BREAK|>",
    "TILE_GLOBAL",
    *TILES,
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register
class AyaVision(Family):
    name = "aya_vision"
    model_classes = ("AyaVisionForConditionalGeneration", "AyaVisionModel")
    vision_refusal = (
        "its projector reads a pixel shuffle of each tile's full patch grid, which a window merge "
        "breaks; set vision=false"
    )

    def check(self) -> None:
        if self.text_config.model_type == "cohere2":
            raise VistrimError(
                f"{self.name}: a Cohere 2 language model is not supported (sliding-window layers "
                "alternate with global layers that use no rotary positions)"
            )
        super().check()

    def image_index(self, inputs: dict, layout: Layout, processor=None) -> torch.Tensor:
        """Each tile is a run (``TILE_i`` / ``TILE_GLOBAL`` between them); an image's last run is
        followed by the processor's ``end_of_img_token``."""
        if int(layout.item.max()) <= 0:
            return layout.item
        end = _token_id(processor, "end_of_img_token")
        if end is None:
            raise VistrimError(
                f"{self.name}: which tiles form an image needs the processor's end_of_img_token"
            )
        ids = inputs["input_ids"]
        after = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1)
        return group_runs(layout.item, layout.visual & (after == end))

    def token_cells(self, inputs: dict, image: int, *, processor=None, image_size=None) -> TokenCells:
        """The image's tiles are ``pixel_values`` entries in prompt order (``TILE_1`` ...), the
        global tile last when there are several; their grid is the GotOcr2 image processor's own
        choice for the image's size (``processor``, ``image_size``), checked against the tile count.
        A tile's tokens are its patch grid through the projector's ``pixel_shuffle`` (run on an
        index probe): one cell per ``downsample_factor``-square patch block."""
        if inputs.get("pixel_values") is None:
            raise VistrimError(f"{self.name}: token cells need pixel_values")
        vision, scale = self.config.vision_config, self.config.downsample_factor
        strategy = self.config.vision_feature_select_strategy
        if strategy != "full":
            raise VistrimError(
                f"{self.name}: token cells are known for vision_feature_select_strategy='full'"
            )
        side = vision.image_size // vision.patch_size
        local = shuffled_cells(self.name, self.core.multi_modal_projector.pixel_shuffle, side, scale)
        return got_ocr2_cells(
            self,
            inputs,
            image,
            processor,
            image_size,
            local,
            side // scale,
            vision.patch_size * scale,
            "global tile",
        )

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """4 Cohere decoder layers (GQA 4/2), a 2-layer SigLIP tower on 32x32 tiles with patch 4
        (8x8 patches), 2x2 pixel shuffle, so each tile gives 16 tokens; up to 4 tiles + a global."""
        from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        tile, patch, factor = 32, 4, 2
        tokenizer = word_level_tokenizer(_WORDS, PLACEHOLDERS)
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=4
        )
        processor = AyaVisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            img_size=tile,
            downsample_factor=factor,
            chat_template=CHAT_TEMPLATE,
        )
        text = tiny_text(tokenizer, model_type="cohere")
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=tile,
            patch_size=patch,
        )
        config = AyaVisionConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
            downsample_factor=factor,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        return seeded(
            AyaVisionForConditionalGeneration, config, seed, attn_implementation, tokenizer
        ), processor


def _token_id(processor, attribute: str) -> int | None:
    """The id of the processor's token named by ``attribute`` (None without a processor)."""
    token = getattr(processor, attribute, None)
    tokenizer = getattr(processor, "tokenizer", None)
    return None if token is None or tokenizer is None else int(tokenizer.convert_tokens_to_ids(token))
