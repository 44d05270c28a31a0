"""Prefill FLOPs of a LLaVA as pure functions of token counts (specs/measurement.md, "Compute").

A multiply-add counts as 2 FLOPs. Included: every decoder layer (with the token count that layer
actually processed), the vision tower (patch embedding + every encoder layer, all of which run even
though LLaVA reads layer -2) and the two-layer projector. Excluded: embedding lookups, norms,
activations, rotary embeddings and the LM head (generate computes prefill logits for one position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

INCLUDED = "decoder layers + vision tower (patch embedding and all encoder layers) + projector"
DECODER_ONLY = "decoder layers only (no FLOPs formula for this family's tower)"


def included(shape: FlopsShape) -> str:
    """What the FLOPs of ``shape`` count: the tower too, or the decoder only."""
    return INCLUDED if shape.vision_layers else DECODER_ONLY


@dataclass(frozen=True)
class FlopsShape:
    """The widths the formulas need, from a model's family (``Family.flops_shape()``). A family
    whose tower the formulas do not describe gives ``vision_layers = 0`` (decoder only)."""

    hidden: int  # d
    kv_width: int  # d_kv = key/value heads x head dim
    intermediate: int  # m, SwiGLU width
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    patch_size: int
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def decoder_layer_flops(n: float, d: int, d_kv: int, m: int) -> float:
    """One Llama layer on n tokens: q/o (2d^2) and k/v (2d*d_kv) projections, scores and weighted
    sum (4n^2 d), SwiGLU MLP with three d x m matrices (6nmd)."""
    return 2 * n * (2 * d * d + 2 * d * d_kv) + 4 * n * n * d + 6 * n * d * m


def vision_layer_flops(n: float, d: int, m: int) -> float:
    """One CLIP encoder layer on n tokens: four d x d projections, attention, two-matrix MLP."""
    return 2 * n * 4 * d * d + 4 * n * n * d + 2 * 2 * n * d * m


def patch_embedding_flops(shape: FlopsShape) -> float:
    """The patch convolution: one (channels * p^2) x d_vision product per patch."""
    return 2 * shape.patches * shape.channels * shape.patch_size**2 * shape.vision_hidden


def projector_flops(n_visual: float, vision_hidden: int, hidden: int) -> float:
    """LLaVA's projector: d_vision -> d and d -> d linear layers on each visual token."""
    return 2 * n_visual * (vision_hidden * hidden + hidden * hidden)


def vision_tower_flops(shape: FlopsShape, layer_tokens: Sequence[float] | None = None) -> float:
    """One image through the tower; ``layer_tokens`` are the tokens (CLS included) each encoder
    layer processed, ``None`` for the untouched tower (patches + CLS everywhere)."""
    if layer_tokens is None:
        layer_tokens = [shape.patches + 1] * shape.vision_layers
    layers = sum(vision_layer_flops(n, shape.vision_hidden, shape.vision_intermediate) for n in layer_tokens)
    return patch_embedding_flops(shape) + layers


def prefill_flops(
    shape: FlopsShape,
    layer_tokens: Sequence[float],
    n_visual: float,
    images: float = 1.0,
    vision_tokens: Sequence[float] | None = None,
) -> dict[str, float]:
    """Prefill FLOPs of one sample, by part. ``layer_tokens``: tokens (text + visual) each decoder
    layer processed; ``n_visual``: visual tokens entering the projector; ``images`` per sample."""
    decoder = sum(
        decoder_layer_flops(n, shape.hidden, shape.kv_width, shape.intermediate) for n in layer_tokens
    )
    vision = images * vision_tower_flops(shape, vision_tokens)
    projector = projector_flops(n_visual, shape.vision_hidden, shape.hidden)
    return {
        "decoder": decoder,
        "vision": vision,
        "projector": projector,
        "total": decoder + vision + projector,
    }


def flops_ratio(pruned: dict[str, float], unpruned: dict[str, float]) -> float:
    return pruned["total"] / unpruned["total"]
