"""ST3: progressive visual-token pruning in prefill, visual-token annealing while decoding."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import VistrimError
from ..ops.schedule import anneal, layer_ratio, stride_ratio
from ..ops.select import budget_counts, ratio_count
from .base import Budget, Counting, Ratio, layer_average, register, scale_layer, solve_increasing
from .scorer import ScorerMethod


@register
@dataclass
class ST3(ScorerMethod):
    """ST3, "Spatial-Temporal Visual Token Trimming" (Zhuang et al., AAAI 2025, arXiv 2412.20105),
    *reconstructed from the paper's abstract*: no code or method section is public, so every
    choice below is a field and results name the settings used.

    PVTP (Progressive Visual Token Pruning, prefill): layer l processes
    N_l = ceil(N_0 * rho(l)) visual tokens, rho non-increasing. Schedules:
    ``stride`` (the form a quotation of the paper names, a stride S and a pruning ratio R): after
    layer K and then every S layers the visual tokens shrink by R, rho(l) = (1 - R)^c(l) with c(l)
    the cuts before layer l, never below rho_min; ``linear`` / ``cosine``: 1 up to K, falling to
    rho_min at layer E, constant after; ``step``: an explicit list of (layer, ratio). Before each
    layer where N_l drops, the survivors are re-ranked by the attention the query tokens pay them
    at the previous layer (rebuilt from q and cached k), so selection is nested. rho_min = 0 (or
    R = 1) leaves "lazy" deep layers with no visual token.

    VTA (Visual Token Annealing, decoding): at decoding step t (t = 0 is the first generated
    token) layer l keeps at most N_l(t) = max(ceil(N_l(0) * f(t)), floor) visual KV entries,
    N_l(0) being what PVTP left; f is ``linear`` 1 - t/T, ``cosine`` or ``exponential``
    exp(-t/tau). Every ``every`` steps, after the layer has run, the entries the current token
    attends to least (optionally an exponential moving average over steps) are evicted for good.

    Paper symbols -> fields: K -> ``start_layer``, S -> ``stride``, R -> ``prune_ratio``,
    E -> ``end_layer``, rho_min -> ``min_ratio``, rho -> ``schedule`` / ``steps``, f -> ``curve``,
    T or tau -> ``horizon``, floor -> ``min_keep`` (a float is a share of N_l(0), an int a count).
    Layer fields are given for a ``depth_ref``-layer model and scaled to the model's depth
    (0 = use them as given).
    Defaults: the ``stride`` form, because it is the parametrisation the paper's own ablation
    names (S and R, per a quotation of the paper through a third-party extraction: medium
    confidence), whereas the ``linear``/``cosine`` forms are ours. K=2, S=2, R=0.2 of 32 layers
    (VTA: T=112 linear, re-selected every 8 steps), calibrated with ``vistrim bench`` on the
    LLaVA-1.5-geometry model (576 visual tokens, 30 layers): 196 layer-averaged visual tokens
    (34%), prefill FLOPs 43% of unpruned (vision tower included), KV cache 29% of unpruned after
    a 64-token answer, prefill 2.25x faster (the earlier linear default, K=2, E=18, rho_min=0:
    192 tokens, 43%, 29%, 2.05x in the same run). Re-selecting every step scores and compacts
    every layer's cache at every step, which costs more than it saves while decoding is
    weight-bound (CPU, small batches); ``every=1`` is the finest setting.
    """

    name = "st3"
    summary = "visual tokens leave progressively with depth (prefill) and anneal per layer while decoding"
    keep_all_settings = {"min_ratio": 1.0, "min_keep": 1.0}
    pruning_settings = {"horizon": 4.0, "every": 1}

    pvtp: Annotated[bool, Field(description="progressive pruning in prefill")] = True
    start_layer: Annotated[int, Field(ge=0, description="K: the last layer that sees every visual token")] = 2
    end_layer: Annotated[int, Field(ge=0, description="E: linear/cosine reach rho_min at this layer")] = 18
    min_ratio: Annotated[Ratio, Field(description="rho_min: the lowest share of visual tokens")] = 0.0
    schedule: Annotated[
        Literal["linear", "cosine", "step", "stride"], Field(description="rho(l): the prefill keep schedule")
    ] = "stride"
    steps: Annotated[
        tuple[tuple[int, Ratio], ...], Field(description="schedule=step: (layer, ratio) pairs")
    ] = ()
    stride: Annotated[int, Field(ge=1, description="S (schedule=stride): layers between cuts")] = 2
    prune_ratio: Annotated[
        Ratio, Field(description="R (schedule=stride): share of the remaining visual tokens each cut drops")
    ] = 0.2
    queries: Annotated[
        Literal["last", "text"], Field(description="query rows that score: last token, or text after image")
    ] = "last"
    vta: Annotated[bool, Field(description="visual-token annealing while decoding")] = True
    curve: Annotated[
        Literal["linear", "cosine", "exponential"], Field(description="f(t): the annealing curve")
    ] = "linear"
    horizon: Annotated[float, Field(gt=0, description="T (or tau): steps until f reaches 0")] = 112.0
    min_keep: Annotated[Budget, Field(description="floor of N_l(t): a share of N_l(0) or a count")] = 0
    every: Annotated[int, Field(ge=1, description="re-select the visual cache every this many steps")] = 8
    smoothing: Annotated[
        float, Field(ge=0.0, le=0.99, description="EMA weight of past steps' attention (0 = none)")
    ] = 0.0
    depth_ref: Annotated[int, Field(ge=0, description="layer fields are for this depth (0 = as given)")] = 32

    def validate(self) -> None:
        if self.end_layer < self.start_layer:
            raise VistrimError(
                f"st3.end_layer={self.end_layer} is out of range: must be >= start_layer={self.start_layer}"
            )
        if self.schedule == "step":
            if not self.steps:
                raise VistrimError(
                    "st3.steps is empty: schedule=step needs (layer, ratio) pairs, e.g. 8:0.5,16:0.25"
                )
            layers, ratios = zip(*self.steps)
            if list(layers) != sorted(set(layers)) or min(layers) < 0:
                raise VistrimError(f"st3.steps layers must be increasing and >= 0, got {list(layers)}")
            if list(ratios) != sorted(ratios, reverse=True):
                raise VistrimError(
                    f"st3.steps ratios must be in [0, 1] and non-increasing, got {list(ratios)}"
                )

    def bind(self, geo) -> None:
        if self.schedule not in ("linear", "cosine"):
            return
        if self.depth_ref and self.end_layer > self.depth_ref:
            raise VistrimError(f"st3.end_layer={self.end_layer} is beyond depth_ref={self.depth_ref}")
        if not self.depth_ref and self.end_layer > geo.num_layers:
            raise VistrimError(
                f"st3.end_layer={self.end_layer} is beyond the model's {geo.num_layers} layers"
            )

    # ------------------------------------------------------------------ schedules
    def ratios(self, num_layers: int) -> list[float]:
        """rho(l) for every decoder layer of a ``num_layers``-layer model (1 everywhere without PVTP)."""
        if not self.pvtp:
            return [1.0] * num_layers

        def scale(layer: int) -> int:
            return scale_layer(layer, self.depth_ref or None, num_layers)

        if self.schedule == "stride":
            depth = self.depth_ref or num_layers
            cuts = [scale(at) for at in range(self.start_layer, depth, self.stride)]
            return [
                stride_ratio(layer, cuts, self.prune_ratio, self.min_ratio) for layer in range(num_layers)
            ]
        steps = [(scale(layer), ratio) for layer, ratio in self.steps]
        return [
            layer_ratio(
                layer,
                start=scale(self.start_layer),
                end=scale(self.end_layer),
                min_ratio=self.min_ratio,
                kind=self.schedule,
                steps=steps,
            )
            for layer in range(num_layers)
        ]

    def cut_layers(self, num_layers: int) -> list[int]:
        ratios = self.ratios(num_layers)
        return [layer - 1 for layer in range(1, num_layers) if ratios[layer] < ratios[layer - 1]]

    def kept(self, layer: int, initial: int, current: int, num_layers: int) -> int:
        return ratio_count(self.ratios(num_layers)[layer + 1], initial)

    def score(self, ctx, layer: int):
        return ctx.attention(self.queries).probs.sum(1)

    def at_budget(
        self, target: float, n_visual: int, num_layers: int, counting: Counting = "processed"
    ) -> ST3:
        """Keeps the schedule's shape. ``linear``/``cosine``: E moves down (with rho_min = 0) only
        as far as a low budget needs, and K too if even E = K is not enough; then rho_min is solved
        for the exact average. ``stride``: R is solved, K moving earlier only if R = 1 is not enough."""
        if self.schedule == "step" or not self.pvtp:
            raise VistrimError("st3 budget mode needs pvtp=true and schedule=linear, cosine or stride")

        def average(**changes) -> float:
            counts = dataclasses.replace(self, **changes).predict_prefill(n_visual, num_layers)
            return layer_average(counts, counting)

        start = self.start_layer
        if self.schedule == "stride":
            while start > 0 and average(start_layer=start, prune_ratio=1.0) > target:
                start -= 1
            keep = solve_increasing(lambda k: average(start_layer=start, prune_ratio=1 - k), target, 0.0, 1.0)
            return dataclasses.replace(self, start_layer=start, prune_ratio=1 - keep)
        end = self.end_layer
        while start > 0 and average(start_layer=start, end_layer=start, min_ratio=0.0) > target:
            start -= 1
        if average(start_layer=start, end_layer=end, min_ratio=0.0) > target:
            fitting = [
                e
                for e in range(start, end + 1)
                if average(start_layer=start, end_layer=e, min_ratio=0.0) <= target
            ]
            end = max(fitting) if fitting else start
        min_ratio = solve_increasing(
            lambda m: average(start_layer=start, end_layer=end, min_ratio=m), target, 0.0, 1.0
        )
        return dataclasses.replace(self, start_layer=start, end_layer=end, min_ratio=min_ratio)

    def decode_target(self, n0: torch.Tensor, step: int) -> torch.Tensor:
        """N_l(t) for layers that held ``n0`` visual entries after prefill ((B,), or (layers, B))."""
        factor = anneal(step, curve=self.curve, horizon=self.horizon)
        annealed = torch.ceil(n0.double() * factor - 1e-9).long()
        return torch.minimum(torch.maximum(annealed, budget_counts(self.min_keep, n0)), n0)

    # ------------------------------------------------------------------ prefill end
    def on_prefill_end(self, ctx) -> None:
        if self.vta:
            for layer in range(ctx.geometry.num_layers):
                ctx.cache_layer(layer).row_notes["st3_n0"] = ctx.visual_counts(layer)

    # ------------------------------------------------------------------ decoding
    def decode_layers(self, geo):
        return range(geo.num_layers) if self.vta else ()

    def on_decode_layer(self, ctx, layer: int) -> None:
        step = ctx.step
        select = step > 0 and step % self.every == 0
        if not (select or self.smoothing):
            return
        cache_layer = ctx.cache_layer(layer)
        if not bool(cache_layer.row_notes["st3_n0"].any()):
            return
        scores = ctx.attention("last").probs[:, 0]
        if self.smoothing:
            scores = self._smoothed(ctx, cache_layer, layer, scores)
        if select:  # selected for every scored layer at once, after the step (on_decode_end)
            ctx.scratch.setdefault("st3_scores", []).append((layer, scores))

    def on_decode_end(self, ctx) -> None:
        scored = ctx.scratch.pop("st3_scores", [])
        if not scored:
            return
        layers, scores = (list(column) for column in zip(*scored))
        n0 = torch.stack([ctx.cache_layer(layer).row_notes["st3_n0"] for layer in layers])
        ctx.evict_top_layers(layers, scores, self.decode_target(n0, ctx.step))

    def _smoothed(self, ctx, cache_layer, layer: int, scores: torch.Tensor) -> torch.Tensor:
        index, _ = ctx.visual_slots(layer)
        current = torch.zeros(cache_layer.live.shape, dtype=scores.dtype, device=scores.device)
        current.scatter_(1, index, scores)
        previous = cache_layer.entry_notes.get("st3_ema")
        ema = current if previous is None else self.smoothing * previous + (1 - self.smoothing) * current
        cache_layer.entry_notes["st3_ema"] = ema
        return ema.gather(1, index)
