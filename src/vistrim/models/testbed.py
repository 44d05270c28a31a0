"""The embedded test-bed: a small stock LLaVA trained on easy-vqa, shipped inside the package.

It is the library's default model for measuring how much accuracy a visual-token pruning method
keeps: unlike the random tiny model its answers are right (>= 97% on the easy-vqa test set) and they
come from the image, so dropping the wrong visual tokens costs accuracy.

Architecture (``LlavaForConditionalGeneration``, nothing custom):

* CLIP vision tower: 96x96 images, patch 8 -> 144 patch tokens + CLS; features from layer -2 with
  the ``default`` strategy (CLS dropped), exactly as LLaVA-1.5 does.
* Two-layer GELU projector.
* Llama language model with grouped-query attention (4 query heads sharing 2 key/value heads) and a
  word-level vocabulary over the easy-vqa questions and answers.

Prompt: ``USER: <image>\\n{question} ASSISTANT:``; the answer is one word followed by ``</s>``.
``scripts/train_testbed.py`` builds the untrained model with :func:`build_testbed` and trains it;
the model card next to the weights records the recipe and the measured accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..compat import LOAD_OPTIONS
from ..data.easyvqa import vocabulary
from .tiny import build_processor, llava_from_configs

TESTBED_DIR = Path(__file__).resolve().parent.parent / "assets" / "testbed"


@dataclass(frozen=True)
class TestbedSize:
    """Geometry of the test-bed; the defaults are the shipped model."""

    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 128
    vision_intermediate: int = 512
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_intermediate: int = 512
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 2


# A few-second configuration for tests of the training script; not a useful model.
TINY_SIZE = TestbedSize(
    image_size=32,
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=3,
    vision_heads=2,
    text_hidden=32,
    text_intermediate=64,
    text_layers=2,
)


def build_testbed(
    seed: int = 0, size: TestbedSize = TestbedSize(), attn_implementation: str = "sdpa"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained test-bed and its processor; weights are deterministic for a given ``seed``."""
    return build_sized(size, vocabulary(), seed, attn_implementation, max_position_embeddings=512)


def build_sized(
    size, words: list[str], seed: int, attn_implementation: str, **text
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A stock LLaVA with a CLIP tower and a Llama language model of ``size``'s widths (either
    test-bed's size dataclass) over a word-level vocabulary; ``text``: further Llama settings."""
    processor = build_processor(size.image_size, size.patch_size, words=words)
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    model = llava_from_configs(
        processor,
        vision,
        seed,
        attn_implementation,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        **text,
    )
    return model, processor


def load_testbed(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    folder: Path = TESTBED_DIR,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The trained test-bed (or the one in ``folder``) and its processor from the package assets
    (no network access)."""
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **LOAD_OPTIONS
    )
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return model.to(device).eval(), processor
