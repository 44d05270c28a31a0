"""FastV: one attention-ranked cut after an early layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ops.select import budget_counts
from .base import Budget, Method, check_budget, check_layer, one_cut_at_budget, one_cut_counts, register


@register
@dataclass
class FastV(Method):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

    After layer K every deeper layer sees only the top-R visual tokens, ranked by the attention the
    last prompt token pays to them at layer K-1 (head-averaged). Paper symbols -> fields:
    K -> ``layer`` (first layer that sees the reduced set), R -> ``keep`` (a float is the kept
    ratio, the paper's "filtering ratio" being 1 - keep; an int is a token count).
    The reference code reads the row from eager attention maps; here it is rebuilt from q and the
    cached keys, so the model keeps SDPA.
    """

    name = "fastv"
    summary = "after layer K keep the visual tokens the last prompt token attends to most"

    layer: int = 2
    keep: Budget = 0.5

    def validate(self) -> None:
        check_budget(self.keep, "fastv.keep")

    def bind(self, geo) -> None:
        check_layer(self.layer, "fastv.layer", geo, low=1)

    def prefill_layers(self, geo):
        return (self.layer - 1,)

    def on_prefill_layer(self, ctx, layer: int) -> None:
        scores = ctx.attention("last").probs[:, 0]
        ctx.keep_top(scores, budget_counts(self.keep, ctx.visual_counts()))

    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        return one_cut_counts(self.layer, self.keep, n_visual, num_layers)

    def at_budget(self, target: float, n_visual: int, num_layers: int) -> FastV:
        layer, keep = one_cut_at_budget(self.layer, target, n_visual, num_layers)
        return dataclasses.replace(self, layer=layer, keep=keep)
