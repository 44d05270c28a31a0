"""PyramidDrop: a fraction of the visual tokens leaves at the end of each stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ops.select import budget_counts, ratio_count
from .base import Method, check_range, layer_average, register, solve_increasing


@register
@dataclass
class PyramidDrop(Method):
    """PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247).

    The decoder is split into S equal stages; at the end of each stage but the last, a fraction
    lambda of the remaining visual tokens is kept, ranked by the attention of the last instruction
    token at the stage's last layer (rebuilt from q and k). Paper symbols -> fields: S -> ``stages``
    (4 stages of 8 layers in a 32-layer model, scaled to the model's depth), lambda -> ``ratio``.
    Choice: the ranking uses the last layer of the ending stage (as FastV uses layer K-1), so no
    extra key projection is computed for the first layer of the next stage.
    """

    name = "pdrop"
    summary = "at the end of each of S equal stages keep a fraction lambda of the visual tokens"

    stages: int = 4
    ratio: float = 0.5

    def validate(self) -> None:
        check_range(self.stages, "pdrop.stages", low=1)
        check_range(self.ratio, "pdrop.ratio", 0.0, 1.0)

    def bind(self, geo) -> None:
        check_range(self.stages, "pdrop.stages", 1, geo.num_layers)

    def stage_ends(self, num_layers: int) -> list[int]:
        """Last layer of every stage but the final one."""
        return [round(s * num_layers / self.stages) - 1 for s in range(1, self.stages)]

    def prefill_layers(self, geo):
        return self.stage_ends(geo.num_layers)

    def on_prefill_layer(self, ctx, layer: int) -> None:
        scores = ctx.attention("last").probs[:, 0]
        ctx.keep_top(scores, budget_counts(self.ratio, ctx.visual_counts()))

    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        ends, counts, current = set(self.stage_ends(num_layers)), [], n_visual
        for layer in range(num_layers):
            counts.append(current)
            if layer in ends:
                current = ratio_count(self.ratio, current)
        return counts

    def at_budget(self, target: float, n_visual: int, num_layers: int) -> PyramidDrop:
        """Solves lambda; adds stages (an earlier first cut) only when the budget needs it."""
        method = self

        def average(ratio: float) -> float:
            return layer_average(
                dataclasses.replace(method, ratio=ratio).predict_prefill(n_visual, num_layers)
            )

        while method.stages < num_layers and average(0.0) > target:
            method = dataclasses.replace(method, stages=method.stages + 1)
        return dataclasses.replace(method, ratio=solve_increasing(average, target, 0.0, 1.0))
