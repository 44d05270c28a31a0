"""The base of score-driven methods: a method writes its fields, its schedule and ``score()``.

As kvpress's ``ScorerPress`` owns selection and removal and a press only scores, ``ScorerMethod``
owns everything around a prefill cut: per-sample counts, the cut itself, the counts it predicts
and the budget mode. FastV, random, PyramidDrop and ST3's PVTP are one each.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import VistrimError
from .base import Counting, Method, _hints, _members, layer_average, solve_count, solve_increasing


@dataclasses.dataclass
class ScorerMethod(Method):
    """Cuts visual tokens after a few prefill layers, keeping the highest-scoring ones.

    A subclass writes:

    - ``cut_layers(num_layers)``: the layers after which visual tokens are cut;
    - ``kept(layer, initial, current, num_layers)``: how many of one sample's ``current`` visual
      tokens stay after the cut after ``layer`` (``initial``: how many its prompt had);
    - ``score(ctx, layer)``: (B, V) scores over the visual slots (``ctx.visual_slots()``), higher
      is kept; e.g. ``ctx.attention("last").probs[:, 0]``.

    Budget mode: ``budget_field`` names the field solved so that the layer-averaged count meets a
    target (a field that takes counts is solved as a count, a ratio field by bisection in [0, 1]).
    When even its lowest value leaves too many tokens, ``earlier()`` moves the first cut earlier
    (one step at a time) and the solve repeats; the default cut stays whenever it can.
    """

    budget_field: ClassVar[str] = ""

    # ------------------------------------------------------------------ to write
    def cut_layers(self, num_layers: int) -> list[int]:
        raise NotImplementedError

    def kept(self, layer: int, initial: int, current: int, num_layers: int) -> int:
        raise NotImplementedError

    def score(self, ctx, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def earlier(self, num_layers: int) -> ScorerMethod | None:
        """A copy whose first cut comes one step earlier, or None (budget mode only)."""
        return None

    # ------------------------------------------------------------------ owned here
    def prefill_layers(self, geo):
        return self.cut_layers(geo.num_layers)

    def on_prefill_layer(self, ctx, layer: int) -> None:
        current = ctx.visual_counts()
        initial = ctx.initial_visual_counts().tolist()
        depth = ctx.geometry.num_layers
        counts = [self.kept(layer, int(a), int(b), depth) for a, b in zip(initial, current.tolist())]
        counts = torch.minimum(torch.tensor(counts, device=current.device), current)
        ctx.keep_top(self.score(ctx, layer), counts)

    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        cuts, counts, current = set(self.cut_layers(num_layers)), [], n_visual
        for layer in range(num_layers):
            counts.append(current)
            if layer in cuts:
                current = min(current, self.kept(layer, n_visual, current, num_layers))
        return counts

    def at_budget(
        self, target: float, n_visual: int, num_layers: int, counting: Counting = "processed"
    ) -> ScorerMethod:
        field = self.budget_field
        if not field:
            raise VistrimError(f"method {self.name!r} has no budget mode")
        as_count = int in _members(_hints(type(self))[field])

        def average(method: ScorerMethod, value) -> float:
            counts = dataclasses.replace(method, **{field: value}).predict_prefill(n_visual, num_layers)
            return layer_average(counts, counting)

        method = self
        while average(method, 0 if as_count else 0.0) > target:
            earlier = method.earlier(num_layers)
            if earlier is None:
                break
            method = earlier
        if as_count:
            value = solve_count(lambda c: average(method, c), target, n_visual)
        else:
            value = solve_increasing(lambda r: average(method, r), target, 0.0, 1.0)
        return dataclasses.replace(method, **{field: value})
