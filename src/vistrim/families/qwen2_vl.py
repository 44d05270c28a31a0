"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, 3-axis rotary positions (mRoPE), videos.

- Visual tokens: ``<|image_pad|>`` and ``<|video_pad|>`` placeholders, t*h*w/4 per image or video
  (different for each image); the ``<|vision_start|>``/``<|vision_end|>`` tokens around them are
  text and never dropped.
- Positions: the core builds (3, B, n) mRoPE ids (image tokens repeat along t/h/w) and keeps
  ``rope_deltas``; the language model folds them into ordinary (B, n, d) cos/sin before its layers,
  so a cut slices them like Llama's. New tokens continue at text position + ``rope_deltas``;
  ``positions=renumber`` is refused (there is no single contiguous numbering of three axes).
- Videos: ``pixel_values_videos`` + ``video_grid_thw`` (+ ``second_per_grid_ts`` in 2.5); their
  placeholders are visual tokens like an image's (``mm_token_type_ids`` 2), trimmed with them.
  Where torchvision is missing, ``models.processors.with_frame_videos`` lets the processor take a
  video as frames (the tiny processors do).
- Vision stage: refused. The tower attends over packed patches of every image (windowed in 2.5)
  and a 2x2 PatchMerger turns four patches into one token; a window merge would need a new
  patch grid per image and consistent mRoPE ids for the merged tokens, which we do not define.
"""

from __future__ import annotations

import torch

from ..errors import VistrimError
from .base import Family, TokenCells, image_token_count, register

PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register
class Qwen2VL(Family):
    name = "qwen2_vl"
    model_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
    )
    videos = True
    renumber = False
    vision_refusal = (
        "its tower attends over packed patches (windows in 2.5) and a 2x2 PatchMerger follows; "
        "set vision=false"
    )

    def continue_positions(self, kwargs: dict, start: int, length: int, batch: int, device):
        mask = kwargs.get("attention_mask")
        if mask is not None:
            return None  # the core numbers new tokens from the 2-D mask: original coordinates
        deltas = self.core.rope_deltas
        text = torch.arange(start, start + length, device=device).expand(batch, length)
        if deltas is not None:
            text = text + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return text[None].expand(3, batch, length)

    def vision_sequences(self, inputs: dict) -> int:
        """The tower packs every image's and video's patches into one tensor (``pixel_values`` is
        (patches, dim)); each grid row of ``image_grid_thw`` / ``video_grid_thw`` is one sequence."""
        grids = [inputs.get(key) for key in ("image_grid_thw", "video_grid_thw")]
        return sum(int(grid.shape[0]) for grid in grids if grid is not None)

    def token_cells(self, inputs: dict, image: int, *, processor=None, image_size=None):
        """An image of t x h x w patches enters as t*(h/m)*(w/m) tokens (m = spatial_merge_size),
        frame by frame in raster order over the merged grid; the processor resizes without
        cropping, so the grid spans the whole picture."""
        grid = inputs.get("image_grid_thw")
        if grid is None or inputs.get("pixel_values_videos") is not None:
            raise VistrimError(f"{self.name}: token cells are known for image-only prompts (image_grid_thw)")
        t, h, w = (int(v) for v in grid[image])
        merge = self.config.vision_config.spatial_merge_size
        rows, cols = h // merge, w // merge
        count = image_token_count(self.layout(inputs["input_ids"], inputs), image)
        if count != t * rows * cols:
            raise VistrimError(f"{self.name}: image {image} has {count} tokens, its grid {t}x{rows}x{cols}")
        return TokenCells(rows, cols, [[k % (rows * cols)] for k in range(count)])

    @classmethod
    def tiny_variants(cls):
        return {
            "qwen2_vl": cls.tiny,
            "qwen2_5_vl": lambda seed=0, attn_implementation="sdpa": cls.tiny(
                seed, attn_implementation, version="2.5"
            ),
        }

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa", *, version: str = "2"):
        """Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``): 4 decoder layers (GQA 4/2, q/k/v
        bias), a 2-layer tower with patch 4 and a 2x2 merger, so a 32x32 image gives 16 tokens."""
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
            Qwen2VLProcessor,
        )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from ..models.processors import image_only, with_frame_videos
        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        tokenizer = word_level_tokenizer(
            _WORDS, PLACEHOLDERS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
        )
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=4,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64},
        )
        processor = with_frame_videos(
            image_only(
                Qwen2_5_VLProcessor if version == "2.5" else Qwen2VLProcessor,
                image_processor=image_processor,
                tokenizer=tokenizer,
                chat_template=CHAT_TEMPLATE,
            )
        )
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in PLACEHOLDERS}
        text = tiny_text(
            tokenizer,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        )
        vision = dict(depth=2, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2)
        if version == "2.5":
            config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
            vision.update(
                hidden_size=32,
                out_hidden_size=64,
                intermediate_size=64,
                window_size=16,
                fullatt_block_indexes=[1],
            )
        else:
            config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
            vision.update(embed_dim=32, mlp_ratio=2)
        config = config_cls(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        return seeded(model_cls, config, seed, attn_implementation, tokenizer), processor
