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
- ``vistrim show``: the runs up to the one headed by ``<global-img>`` form the image
  (``image_index``, through the processor's tokenizer); each run is placed by the text token
  before it (``<row_i_col_j>``: the tile grid on the right; the global image on the left), one
  cell per token (``scale_factor``-square patch blocks).
- Vision stage: refused. The connector reads a pixel shuffle of each tile's full patch grid
  (``scale_factor`` x ``scale_factor`` neighbours folded into one token), which a window merge
  inside the tower breaks.
- FLOPs: decoder only (tiles per image and the shuffled connector are not in bench's formulas).
"""

from __future__ import annotations

import re

import torch

from ..errors import VistrimError
from .base import Family, Layout, TokenCells, register
from .tiles import VIEWS_NOTE, group_runs, image_span, shuffled_cells, stitched, view_origins

ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
PLACEHOLDERS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *ROW_COL)
TILE_NAME = re.compile(r"<row_(\d+)_col_(\d+)>")
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

    def image_index(self, inputs: dict, layout: Layout, processor=None) -> torch.Tensor:
        """Each tile and the global image is a run; an image's last run is the one headed by the
        processor's ``<global-img>`` tag."""
        if int(layout.item.max()) <= 0:
            return layout.item
        tokenizer = getattr(processor, "tokenizer", None)
        tag = getattr(processor, "global_image_tag", None) or getattr(processor, "global_image_token", None)
        if tokenizer is None or tag is None:
            raise VistrimError(
                f"{self.name}: which tiles form an image needs the processor's global image tag"
            )
        ids = inputs["input_ids"]
        before = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=-1)
        return group_runs(layout.item, layout.visual & (before == int(tokenizer.convert_tokens_to_ids(tag))))

    def token_cells(self, inputs: dict, image: int, *, processor=None, image_size=None) -> TokenCells:
        """Every run of the image is one ``pixel_values`` entry (the row's entries in prompt
        order), named by the text token before it: ``<row_i_col_j>`` places a tile in the grid,
        ``<global-img>`` is the whole image (left of the grid). A tile's tokens are its patch grid
        through the connector's ``pixel_shuffle`` (run on an index probe): one cell per
        ``scale_factor``-square patch block."""
        tokenizer = getattr(processor, "tokenizer", None)
        if inputs.get("pixel_values") is None or tokenizer is None:
            raise VistrimError(f"{self.name}: token cells need pixel_values and the processor's tokenizer")
        vision, scale = self.config.vision_config, self.config.scale_factor
        side = vision.image_size // vision.patch_size
        local = shuffled_cells(self.name, lambda x: self.core.connector.pixel_shuffle(x, scale), side, scale)
        layout = self.layout(inputs["input_ids"], inputs)
        where, _ = image_span(self.image_index(inputs, layout, processor), image)
        row, start = int(where[0, 0]), int(where[0, 1])
        item, ids = layout.item[row], inputs["input_ids"][row]
        first = int(item[start])  # the row's runs before this image: its entries before this one's
        grid = []
        for run in range(first, int(item[where[-1, 1]]) + 1):
            head = int((item == run).nonzero()[0, 0])
            name = tokenizer.convert_ids_to_tokens(int(ids[head - 1])) if head else ""
            match = TILE_NAME.fullmatch(name or "")
            if len((item == run).nonzero()) != len(local) or not (match or "global" in name):
                raise VistrimError(
                    f"{self.name}: run {run} of the prompt is not a named tile of {len(local)} tokens"
                )
            grid.append((int(match[1]) - 1, int(match[2]) - 1) if match else (-1, -1))
        if (
            first + len(grid) > inputs["pixel_values"].shape[1]
            or grid.count((-1, -1)) != 1
            or len(set(grid)) < len(grid)
        ):
            raise VistrimError(
                f"{self.name}: image {image} is not tiles and one global image of pixel_values"
            )
        origins = view_origins(grid, side // scale)
        placed = [(first + t, top, left) for t, (top, left) in enumerate(origins)]
        return stitched(
            placed, local, side // scale, vision.patch_size * scale, VIEWS_NOTE.format("global image")
        )

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
