"""Random dropping at one layer: the baseline a method must beat."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..ops.select import budget_counts
from .base import Budget, Method, check_budget, check_layer, one_cut_at_budget, one_cut_counts, register


@register
@dataclass
class RandomDrop(Method):
    """Drop visual tokens uniformly at random before layer ``layer`` (cut after layer-1).

    Seeded per sample from ``seed`` and the sample's own prompt tokens, so a sample gets the same
    choice alone or in any batch. ``keep``: a float is the kept ratio, an int a count.
    """

    name = "random"
    summary = "keep a random subset of visual tokens from layer K on (seeded)"

    layer: int = 2
    keep: Budget = 0.5
    seed: int = 0

    def validate(self) -> None:
        check_budget(self.keep, "random.keep")

    def bind(self, geo) -> None:
        check_layer(self.layer, "random.layer", geo, low=1)

    def prefill_layers(self, geo):
        return (self.layer - 1,)

    def on_prefill_layer(self, ctx, layer: int) -> None:
        index, valid = ctx.visual_slots()
        scores = torch.empty(valid.shape, dtype=torch.float32)
        for row, key in enumerate(ctx.sample_keys()):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
            scores[row] = torch.rand(valid.shape[1], generator=generator)
        ctx.keep_top(scores.to(valid.device), budget_counts(self.keep, ctx.visual_counts()))

    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        return one_cut_counts(self.layer, self.keep, n_visual, num_layers)

    def at_budget(self, target: float, n_visual: int, num_layers: int) -> RandomDrop:
        layer, keep = one_cut_at_budget(self.layer, target, n_visual, num_layers)
        return dataclasses.replace(self, layer=layer, keep=keep)
