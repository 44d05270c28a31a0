"""PyramidDrop: a fraction of the visual tokens leaves at the end of each stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ..ops.select import ratio_count
from .base import Ratio, check_range, register
from .scorer import ScorerMethod


@register
@dataclass
class PyramidDrop(ScorerMethod):
    """PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247).

    The decoder is split into S equal stages; at the end of each stage but the last a fraction
    lambda of the visual tokens is kept, ranked by the attention of the last instruction token.
    Paper symbols -> fields: S -> ``stages`` (4 stages of 8 layers in a 32-layer model, scaled to
    the model's depth), lambda -> ``ratio``.

    Defaults (vistrim's rule): the ranking uses the layer that just ran (``rank=this``, as FastV
    uses layer K-1: no extra key projection), positions stay original, and each cut keeps
    ceil(lambda * current) (``rounding=ceil``). ``official=true`` is the released code's rule and
    sets the three switches: ``rank=next`` (the next layer's queries and keys, computed from the
    output of the layer that just ran, at the current positions: released ``rank_layer =
    layer_idx + 1``), ``positions=renumber`` (contiguous positions after each cut, also while
    decoding) and ``rounding=official`` (stage s keeps int(N * lambda^s) of the prompt's N).
    Families with multi-axis positions (mRoPE) refuse renumbering, hence ``official``.
    """

    name = "pdrop"
    summary = "at the end of each of S equal stages keep a fraction lambda of the visual tokens"
    keep_all_settings = {"ratio": 1.0}
    pruning_settings = {"ratio": 0.5}
    budget_field = "ratio"

    stages: Annotated[int, Field(ge=1, description="S: equal stages; a cut ends each but the last")] = 4
    ratio: Annotated[Ratio, Field(description="lambda: share of the visual tokens each cut keeps")] = 0.5
    official: Annotated[
        bool, Field(description="the released rule: sets rank=next, positions=renumber, rounding=official")
    ] = False
    rank: Annotated[
        Literal["this", "next"], Field(description="rank with the layer that just ran or the next one")
    ] = "this"
    positions: Annotated[
        Literal["original", "renumber"], Field(description="keep original positions or renumber them")
    ] = "original"
    rounding: Annotated[
        Literal["ceil", "official"],
        Field(description="counts: ceil(lambda*current), or int(N*lambda^s) as released"),
    ] = "ceil"

    def validate(self) -> None:
        if self.official:
            self.rank, self.positions, self.rounding = "next", "renumber", "official"

    def bind(self, geo) -> None:
        check_range(self.stages, "pdrop.stages", 1, geo.num_layers)

    def cut_layers(self, num_layers: int) -> list[int]:
        """Last layer of every stage but the final one."""
        return [round(s * num_layers / self.stages) - 1 for s in range(1, self.stages)]

    def kept(self, layer: int, initial: int, current: int, num_layers: int) -> int:
        if self.rounding == "official":
            stage = self.cut_layers(num_layers).index(layer) + 1
            return official_count(initial, self.ratio, stage)
        return ratio_count(self.ratio, current)

    def score(self, ctx, layer: int):
        return ctx.attention("last", next_layer=self.rank == "next").probs[:, 0]

    def earlier(self, num_layers: int) -> PyramidDrop | None:
        if self.stages >= num_layers:
            return None
        return dataclasses.replace(self, stages=self.stages + 1)


def official_count(initial: int, ratio: float, stage: int) -> int:
    """int(N * lambda^s), as the released code computes it from a written list of ratios (the
    guard keeps 0.3**2 * 100 at 9, as a written 0.09 gives)."""
    return int(initial * ratio**stage + 1e-9)
