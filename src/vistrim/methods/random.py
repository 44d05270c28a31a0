"""Random dropping at one layer: the baseline a method must beat."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from ..ops.select import kept_count
from .base import Budget, check_layer, register
from .scorer import ScorerMethod


@register
@dataclass
class RandomDrop(ScorerMethod):
    """Drop visual tokens uniformly at random before layer ``layer`` (cut after layer-1).

    Seeded per sample from ``seed`` and the sample's own prompt tokens, so a sample gets the same
    choice alone or in any batch. ``keep``: a float is the kept ratio (rounded up), an int a count.
    """

    name = "random"
    summary = "keep a random subset of visual tokens from layer K on (seeded)"
    keep_all_settings = {"keep": 1.0}
    pruning_settings = {"keep": 0.3}
    budget_field = "keep"

    layer: Annotated[int, Field(ge=1, description="the first layer that sees the reduced set")] = 2
    keep: Annotated[Budget, Field(description="visual tokens kept: a ratio or a count")] = 0.5
    seed: Annotated[int, Field(description="seed, combined with each sample's prompt tokens")] = 0

    def bind(self, geo) -> None:
        check_layer(self.layer, "random.layer", geo, low=1)

    def cut_layers(self, num_layers: int) -> list[int]:
        return [self.layer - 1]

    def kept(self, layer: int, initial: int, current: int, num_layers: int) -> int:
        return kept_count(self.keep, current)

    def score(self, ctx, layer: int):
        _, valid = ctx.visual_slots()
        scores = torch.empty(valid.shape, dtype=torch.float32)
        for row, key in enumerate(ctx.sample_keys()):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
            scores[row] = torch.rand(valid.shape[1], generator=generator)
        return scores.to(valid.device)

    def earlier(self, num_layers: int) -> RandomDrop | None:
        return dataclasses.replace(self, layer=self.layer - 1) if self.layer > 1 else None
