"""FastV: one attention-ranked cut after an early layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ..ops.select import kept_count
from .base import Budget, check_layer, register
from .scorer import ScorerMethod


@register
@dataclass
class FastV(ScorerMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

    After layer K every deeper layer sees only the top-R visual tokens, ranked by the attention the
    last prompt token pays to them at layer K-1 (head-averaged). Paper symbols -> fields:
    K -> ``layer`` (first layer that sees the reduced set), R -> ``keep`` (a float is the kept
    ratio, the paper's "filtering ratio" being 1 - keep; an int is a token count).
    ``rounding``: ``ceil`` (default) keeps ceil(N * keep), never fewer than asked; ``official``
    keeps round(N * keep) as the released code does (round(N * (1 - R)), half to even).
    The reference code reads the row from eager attention maps; here it is rebuilt from q and the
    cached keys, so the model keeps SDPA.
    """

    name = "fastv"
    summary = "after layer K keep the visual tokens the last prompt token attends to most"
    keep_all_settings = {"keep": 1.0}
    pruning_settings = {"keep": 0.25}
    budget_field = "keep"

    layer: Annotated[int, Field(ge=1, description="K: the first layer that sees the reduced set")] = 2
    keep: Annotated[Budget, Field(description="visual tokens kept: a ratio (1 - R) or a count")] = 0.5
    rounding: Annotated[
        Literal["ceil", "official"],
        Field(description="kept count of a ratio: ceil(N*keep), or round(N*keep) as released"),
    ] = "ceil"

    def bind(self, geo) -> None:
        check_layer(self.layer, "fastv.layer", geo, low=1)

    def cut_layers(self, num_layers: int) -> list[int]:
        return [self.layer - 1]

    def kept(self, layer: int, initial: int, current: int, num_layers: int) -> int:
        return kept_count(self.keep, current, self.rounding)

    def score(self, ctx, layer: int):
        return ctx.attention("last").probs[:, 0]

    def earlier(self, num_layers: int) -> FastV | None:
        return dataclasses.replace(self, layer=self.layer - 1) if self.layer > 1 else None
