"""LLaVA-OneVision: ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel`` (SigLIP tower
without CLS, ``vision_feature_select_strategy="full"``, anyres tiles, Qwen2 language model).

- Visual tokens: as LLaVA-NeXT (``families/llava_next.py``): the tiles are packed after the projector,
  unpadded, and when the grid holds more than ``vision_aspect_ratio`` ("anyres_max_N") tiles' worth
  of patches it is interpolated down (bilinear) before the ``image_newline`` rows are added. Prompts
  with several images per sample (``batch_num_images`` > 1) take only the base tile of each image,
  followed by one newline. Newline rows are ``Layout.protected``.
- Videos: every frame is one SigLIP sequence, projected and pooled 2x2; the core appends one
  ``image_newline`` after each video's frames: protected too; the frame tokens are prunable.
- Vision stage: as LLaVA-NeXT's (``families/llava_next.py``), per SigLIP tile. SigLIP has no CLS
  token: the key set's importance is the attention each patch receives in its tile at
  ``key_layer``, averaged over every query and head (rebuilt from q and k). An image whose grid
  the core interpolates (beyond anyres_max) merges only its base tile: an interpolated row blends
  several patches, so a merged token would have no exact place; its interpolated rows are each
  their own token, and their importance is the core's own interpolation of the per-patch
  importance. Which images that is, the index probe tells (a row is an exact patch copy iff the
  probe's id and squared-id channels agree). Samples with several images use base tiles only, each
  merged. Video frames are not merged (the prefill filter and the cache prune them).
"""

from __future__ import annotations

import torch

from .base import register
from .llava_next import CHAT_TEMPLATE, TINY_PATCH, TINY_PINPOINTS, TINY_TILE, LlavaNext

# The tiny model's anyres_max: a 2x2-tile grid (8x8 patches) is over 3 tiles' worth and gets
# interpolated, a 1x2 one is not, so the matrix runs both.
TINY_ASPECT = "anyres_max_3"


@register
class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    videos = True
    _ENCODER_INPUTS = (*LlavaNext._ENCODER_INPUTS, "batch_num_images")

    def _video_newlines(self, length: int) -> torch.Tensor:
        """The core appends image_newline after each video's frames (get_video_features)."""
        return torch.arange(length) == length - 1

    def _pack(self, probe, sizes, newline, call: dict | None = None):
        aspect = (call or {}).get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        packed = self.core.pack_image_features(
            probe, sizes, image_newline=newline, vision_aspect_ratio=aspect
        )
        return packed[0]

    def tiles(self, inputs: dict) -> list[int]:
        """As get_image_features: only samples with a single image are cut into tiles."""
        tiles = super().tiles(inputs)
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            return tiles
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [count if alone else 1 for count, alone in zip(tiles, single)]

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """A SigLIP tower (16x16 tiles, patch 4: 16 patches, no CLS) and a 4-layer Qwen2 (GQA 4/2,
        q/k/v bias); a 32x32 image is a base tile and 2x2 tiles, interpolated to 5x5 patches."""
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            LlavaOnevisionProcessor,
            Qwen2Config,
            SiglipVisionConfig,
        )
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        from ..models.processors import image_only
        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        tokenizer = word_level_tokenizer(_WORDS, ("<video>",), {"video_token": "<video>"})
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": TINY_TILE, "width": TINY_TILE}, image_grid_pinpoints=TINY_PINPOINTS
        )
        processor = image_only(
            LlavaOnevisionProcessor,
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=(TINY_TILE // TINY_PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=TINY_ASPECT,
            chat_template=CHAT_TEMPLATE,
        )
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=TINY_TILE,
            patch_size=TINY_PATCH,
            vision_use_head=False,
        )
        text = Qwen2Config(**tiny_text(tokenizer))
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=TINY_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=TINY_ASPECT,
        )
        return seeded(
            LlavaOnevisionForConditionalGeneration, config, seed, attn_implementation, tokenizer
        ), processor
