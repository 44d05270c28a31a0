"""Test-bed 2: a small stock LLaVA at LLaVA-1.5 token geometry, trained on small shapes on photos.

The LLaVA-1.5 patch grid and at least 16 decoder layers (``Testbed2Size``'s defaults), so
64/128/192 layer-averaged budgets are reachable by single-cut and progressive methods alike; the
answers depend on objects of a few patches each (``vistrim.data.shapes``), so which tokens a
method keeps decides accuracy.

Architecture (``LlavaForConditionalGeneration``, nothing custom): CLIP vision tower (features
from layer -2, ``default`` strategy: CLS dropped), two-layer GELU projector, Llama language model
with grouped-query attention and a word-level vocabulary over the questions and answers.
Prompt: ``USER: <image>\\n{question} ASSISTANT:``; the answer is one word followed by ``</s>``.
``scripts/train_testbed2.py`` builds it with :func:`build_testbed2` and trains it; the model card
next to the weights records the recipe and the measured accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..data.shapes import IMAGE_SIZE, PATCH_SIZE, vocabulary
from .testbed import build_sized, load_testbed

TESTBED2_DIR = Path(__file__).resolve().parent.parent / "assets" / "testbed2"


@dataclass(frozen=True)
class Testbed2Size:
    """Geometry of test-bed 2; the defaults are the shipped model."""

    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    vision_hidden: int = 96
    vision_intermediate: int = 384
    vision_layers: int = 6
    vision_heads: int = 4
    text_hidden: int = 96
    text_intermediate: int = 256
    text_layers: int = 16
    text_heads: int = 4
    text_kv_heads: int = 2
    # slow rotary frequencies: content look-ups from a question word back over ~600 positions
    rope_theta: float = 1e6


# A few-second configuration for tests of the training script (same 24x24 grid); not a useful model.
TINY2_SIZE = Testbed2Size(
    vision_hidden=16,
    vision_intermediate=32,
    vision_layers=2,
    vision_heads=2,
    text_hidden=16,
    text_intermediate=32,
    text_layers=2,
    text_heads=2,
    text_kv_heads=1,
)


def build_testbed2(
    seed: int = 0, size: Testbed2Size = Testbed2Size(), attn_implementation: str = "sdpa"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained test-bed 2 and its processor; weights are deterministic for a given ``seed``."""
    return build_sized(
        size,
        vocabulary(),
        seed,
        attn_implementation,
        max_position_embeddings=1024,
        rope_theta=size.rope_theta,
    )


def load_testbed2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The trained test-bed 2 and its processor from the package assets (no network access)."""
    return load_testbed(device, dtype, attn_implementation, folder=TESTBED2_DIR)
