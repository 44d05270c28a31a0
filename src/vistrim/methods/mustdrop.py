"""MustDrop: visual tokens judged over their whole life — vision encoder, prefill and decoding."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import VistrimError
from ..ops.mustdrop import (
    dual_keep,
    dual_margin,
    dual_scores,
    grid_windows,
    key_tokens,
    merge_plan,
    merge_windows,
    patch_tokens,
    stage_counts,
    window_similarity,
)
from ..runtime.vision import VisionStage
from .base import Budget, Counting, Method, Ratio, check_range, register, resolve_budget, scale_layer

PRESETS = {"192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01)}
DEFAULT_THRESHOLDS = PRESETS["192"]  # alpha, beta without a preset


@register
@dataclass
class MustDrop(Method):
    """MustDrop, "Multi-Stage Vision Token Dropping" (Liu et al., arXiv 2411.10803).

    Vision stage: after vision layer ``merge_layer`` the patch grid is cut into ``window`` x
    ``window`` windows; a window whose mean pairwise cosine similarity is >= ``merge_threshold``
    becomes one token (the plain mean), so later tower layers run on fewer tokens and fewer image
    tokens enter the language model. The key set is the top ``key_ratio`` of the patches by the
    CLS row of attention at vision layer ``key_layer`` (rebuilt from q and k; on towers without a
    CLS token, e.g. SigLIP, by the attention each patch receives, averaged over all queries and
    heads); later stages never drop a key token. ``vision``: ``auto`` (default) runs the merge and
    the key set on families whose tower supports them and skips both elsewhere (recorded in
    ``stats.extra["mustdrop_vision_stage"]``); ``true`` refuses a family without support;
    ``false`` skips the merge (the key set still runs where the tower allows).
    Tile families (LLaVA-NeXT, OneVision) merge inside each tile and keep one placeholder per merged
    token that survives the core's unpad crop (see ``families/llava_next.py``).
    ``official`` reproduces the released code: every sample of a batch merges as
    many windows as the sample with the fewest, merged tokens first; otherwise each sample keeps
    its own count and raster order.
    Prefill stage: after each pruning layer (``layers``, given for ``depth_ref`` layers and scaled),
    S = head-averaged attention of the text tokens after the image to the visual tokens;
    g_j = sum_i S_ij, u_j = max_i S_ij; token j is dropped iff g_j < alpha * sum g and u_j < beta.
    ``preset`` "192"/"128"/"64" selects the released (alpha, beta); an ``alpha`` or ``beta`` given
    explicitly wins over the preset's (unset ones default to the preset's, or to 0.001 each).
    ``budget`` (a count, or a ratio of the prompt's visual tokens) switches to exact-budget mode:
    per-stage counts solved so the layer-averaged visual tokens meet it within one token per
    sample, ranked by the same dual test.
    Decoding stage (``decode``): layers from the first pruning layer on keep in their cache only
    the tokens that survived the last prefill stage. ``decode_evict`` (our extension, not in the
    released code) also evicts, every ``decode_every`` steps, visual entries the generated token
    pays less than ``decode_beta`` attention to.
    ``positions``: ``original`` keeps every token's position; ``renumber`` numbers each layer's
    tokens contiguously, as the released code does (consistently, also while decoding).
    ``attention = "eager"`` materialises full attention matrices for scoring in every layer from
    the first pruning layer on and at the key layer, as the released code does: same choices, for
    measuring what rebuilding only the needed rows saves.
    """

    name = "mustdrop"
    summary = (
        "merge similar windows in the vision tower, dual-attention filter at prefill, output-aware cache"
    )
    keep_all_settings = {"merge_threshold": 2.0, "alpha": 0.0, "beta": 0.0}
    pruning_settings = {"budget": 0.3}

    vision: Annotated[
        bool | Literal["auto"], Field(description="vision-tower stage: auto (where supported), true, false")
    ] = "auto"
    window: Annotated[int, Field(ge=2, description="merge windows are window x window patches")] = 3
    merge_threshold: Annotated[
        float, Field(ge=-1.0, description="a window merges if its mean cosine similarity is >= this")
    ] = 0.8
    merge_layer: Annotated[int, Field(ge=0, description="vision layer after which windows merge")] = 0
    key_ratio: Annotated[Ratio, Field(description="share of patches in the protected key set")] = 0.08
    key_layer: Annotated[int, Field(description="vision layer whose CLS attention picks the key set")] = -1
    official: Annotated[
        bool, Field(description="released merge: equal counts over the batch, merged tokens first")
    ] = False
    prefill: Annotated[bool, Field(description="dual-attention filter at the pruning layers")] = True
    layers: Annotated[
        tuple[int, ...], Field(description="pruning layers, given for depth_ref layers and scaled")
    ] = (2, 6, 10, 14)
    depth_ref: Annotated[int, Field(ge=0, description="layers are given for this depth (0 = as given)")] = 32
    preset: Annotated[
        Literal["", "192", "128", "64"], Field(description="the released (alpha, beta) for a budget")
    ] = ""
    alpha: Annotated[
        float | None, Field(ge=0.0, description="global threshold (share of the summed attention)")
    ] = None
    beta: Annotated[float | None, Field(ge=0.0, description="individual threshold (max attention)")] = None
    budget: Annotated[
        Budget | None, Field(description="exact-budget mode: layer-averaged visual tokens (ratio or count)")
    ] = None
    counting: Annotated[
        Counting, Field(description="budget counted as each layer processes, or post-cut as released logs")
    ] = "processed"
    positions: Annotated[
        Literal["original", "renumber"], Field(description="keep original positions, or renumber as released")
    ] = "original"
    decode: Annotated[bool, Field(description="output-aware cache after prefill")] = True
    decode_evict: Annotated[bool, Field(description="attention-aware eviction while decoding (ours)")] = False
    decode_beta: Annotated[float, Field(ge=0.0, description="decode_evict: attention an entry needs")] = 0.01
    decode_every: Annotated[int, Field(ge=1, description="decode_evict: every this many steps")] = 1
    attention: Annotated[
        Literal["rows", "eager"], Field(description="rows rebuilt from q and k, or full matrices as released")
    ] = "rows"

    def validate(self) -> None:
        if self.prefill and (
            not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0
        ):
            raise VistrimError(
                f"mustdrop.layers must be increasing layer indices >= 0, got {list(self.layers)}"
            )

    @property
    def thresholds(self) -> tuple[float, float]:
        """(alpha, beta) in use: explicit settings, else the preset's, else the defaults."""
        preset = PRESETS.get(self.preset, DEFAULT_THRESHOLDS)
        return (
            preset[0] if self.alpha is None else self.alpha,
            preset[1] if self.beta is None else self.beta,
        )

    def settings(self) -> dict:
        alpha, beta = self.thresholds
        return {**super().settings(), "alpha": alpha, "beta": beta}  # record what ran

    def bind(self, geo) -> None:
        if self.prefill and not self.pruning_layers(geo.num_layers):
            raise VistrimError(f"mustdrop.layers: none falls before the last of {geo.num_layers} layers")

    def _bind_tower(self, tower) -> None:
        """Check the vision-stage settings against the family's tower."""
        layers = len(tower.layers)
        if self.vision:
            check_range(self.merge_layer, "mustdrop.merge_layer", 0, tower.feature_layer - 2)
            check_range(self.window, "mustdrop.window", 2, min(tower.grid))
        if self._needs_keys():
            key = self.key_layer % layers
            if not -layers <= self.key_layer < layers or (self.vision and key <= self.merge_layer):
                raise VistrimError(
                    f"mustdrop.key_layer={self.key_layer} must be a vision layer after merge_layer"
                )

    def _needs_keys(self) -> bool:
        return self.key_ratio > 0 and (self.prefill or self.decode_evict)

    def pruning_layers(self, num_layers: int) -> list[int]:
        scaled = {scale_layer(layer, self.depth_ref or None, num_layers) for layer in self.layers}
        return sorted(layer for layer in scaled if layer < num_layers - 1)

    def at_budget(
        self, target: float, n_visual: int, num_layers: int, counting: Counting = "processed"
    ) -> MustDrop:
        return dataclasses.replace(self, budget=int(round(target)), counting=counting)

    # ------------------------------------------------------------------ vision stage
    def install(self, session) -> None:
        family = session.adapter
        refusal = family.vision_stage_refusal()
        wants_tower = self.vision is True or (self.vision == "auto" and not refusal)
        if not (wants_tower or (self._needs_keys() and not refusal)):
            return
        tower = family.vision_tower()  # a one-line refusal if the family has no vision stage
        self._bind_tower(tower)
        merge = bool(self.vision)  # True, or "auto" on a family whose tower supports the merge
        stage = VisionStage(
            tower,
            reduce_after=self.merge_layer if merge else None,
            reducer=self._reducer(tower) if merge else None,
            probe_layer=self.key_layer % len(tower.layers) if self._needs_keys() else None,
            full_matrix=self.attention == "eager",
        )
        stage.install(session)
        session.state["mustdrop_stage"] = stage

    def on_prefill_start(self, ctx) -> None:
        stage = ctx.session.state.get("mustdrop_stage")
        ctx.session.stats.extra["mustdrop_vision_stage"] = stage is not None and stage.reducer is not None
        features = _image_features(ctx, stage.tower) if stage is not None else None
        found = stage.lookup(features) if features else None
        if found is None:  # no image, or encoded outside this session: the language-model stages still run
            return
        sizes = [int(record.valid[i].sum()) for record, i in found]
        packed = all(r.protected is not None for r, _ in found)  # tile families: rows as packed
        notes = {}
        if self._needs_keys():
            keys = [key_tokens(r.cls[i : i + 1], r.valid[i : i + 1], self.key_ratio)[0] for r, i in found]
            notes["key"] = keys if packed else [k[:n] for k, n in zip(keys, sizes)]
        if packed:
            keep = [r.valid[i] | r.protected[i] for r, i in found]
            ctx.replace_images(features, notes, keep=keep)
        else:
            ctx.replace_images([f[:n] for f, n in zip(features, sizes)], notes)
        stats, record = ctx.session.stats, found[0][0]
        stats.vision_tokens = record.tokens_per_layer
        stats.extra["mustdrop_visual_after_merge"] = sizes
        stats.extra["mustdrop_merged_windows"] = [int(r.merged[i]) for r, i in found if r.merged is not None]
        stats.extra["mustdrop_key_tokens"] = [int(k.sum()) for k in notes.get("key", [])]
        if all(r.patch_token is not None for r, _ in found):
            stats.vision_patch_tokens = [r.patch_token[i] for r, i in found]
        elif stage.reducer is not None and all(r.row_token is not None for r, _ in found):
            stats.vision_row_tokens = [r.row_token[i] for r, i in found]
        stats.key_tokens = notes.get("key")

    def _reducer(self, tower):
        rows, cols = tower.grid
        prefix = tower.prefix
        windows = grid_windows(rows, cols, self.window)
        grid_patches = rows * cols

        def merge_limit(counted: torch.Tensor | None):
            """In budget mode an image merges at most as many windows as still leave the budget's
            tokens (a merge removes window^2 - 1); the language-model stages drop the rest. A tile
            of an image of n tokens keeps its share, budget * P / n of them."""
            if self.budget is None:
                return None
            merge = self.window**2 - 1
            if counted is None:
                return int((grid_patches - resolve_budget(self.budget, grid_patches)) // merge)
            share = [resolve_budget(self.budget, int(n)) * grid_patches / max(1, int(n)) for n in counted]
            return torch.tensor([int((grid_patches - s) // merge) for s in share])

        def reduce(hidden: torch.Tensor, allowed: torch.Tensor | None, counted: torch.Tensor | None):
            head, patches = hidden[:, :prefix], hidden[:, prefix:]
            similarity = window_similarity(patches, windows)
            limit = merge_limit(counted)
            if allowed is None:
                plan = merge_plan(similarity, self.merge_threshold, same_count=self.official, limit=limit)
            else:  # only some sequences may merge (official: equal counts over those)
                plan = torch.zeros_like(similarity, dtype=torch.bool)
                if bool(allowed.any()):
                    if torch.is_tensor(limit):
                        limit = limit.to(allowed.device)[allowed]
                    plan[allowed] = merge_plan(
                        similarity[allowed], self.merge_threshold, same_count=self.official, limit=limit
                    )
            merged_first = self.official
            tokens, valid, source = merge_windows(
                patches, windows, plan, similarity, merged_first=merged_first
            )
            head_valid = torch.ones_like(valid[:, :prefix])
            groups = patch_tokens(windows, plan, source, patches.shape[1])
            return torch.cat([head, tokens], 1), torch.cat([head_valid, valid], 1), plan.sum(-1), groups

        return reduce

    # ------------------------------------------------------------------ prefill stage
    def prefill_layers(self, geo):
        if not self.prefill:
            return ()
        pruning = self.pruning_layers(geo.num_layers)
        return range(pruning[0], geo.num_layers) if self.attention == "eager" else pruning

    def on_prefill_layer(self, ctx, layer: int) -> None:
        pruning = self.pruning_layers(ctx.geometry.num_layers)
        full = self.attention == "eager"
        if layer not in pruning:  # eager mode: the released code materialises attention here too
            ctx.attention("text", full=True)
            return
        rows = ctx.attention("text", full=full)
        g, u = dual_scores(rows.probs, rows.query_valid)
        key = ctx.slot_note("key") if "key" in ctx.state.notes else torch.zeros_like(rows.slot_valid)
        if self.budget is None:
            ctx.keep(dual_keep(g, u, *self.thresholds) | key)
            return
        stage = pruning.index(layer)
        if stage == 0:
            ctx.scratch["mustdrop_counts"] = self._stage_counts(ctx, pruning, key)
        alpha, beta = self.thresholds
        margin = dual_margin(g, u, max(alpha, 1e-12), max(beta, 1e-12)).masked_fill(key, float("inf"))
        ctx.keep_top(margin, ctx.scratch["mustdrop_counts"][:, stage])

    def _stage_counts(self, ctx, pruning: list[int], key: torch.Tensor) -> torch.Tensor:
        """(B, stages) kept counts meeting the layer-averaged budget, per sample."""
        available, original, floor = ctx.visual_counts(), ctx.initial_visual_counts(), key.sum(-1)
        rows = [
            stage_counts(
                int(n),
                resolve_budget(self.budget, int(n0)),
                pruning,
                ctx.geometry.num_layers,
                int(f),
                post_cut=self.counting == "post_cut",
            )
            for n, n0, f in zip(available, original, floor)
        ]
        return torch.tensor(rows, device=available.device)

    # ------------------------------------------------------------------ decoding stage
    def on_prefill_end(self, ctx) -> None:
        if not (self.decode and self.prefill):
            return
        st = ctx.state
        survivors = torch.zeros_like(ctx.prompt_ids, dtype=torch.bool)
        survivors.scatter_(1, st.src, st.live & st.visual)
        for layer in range(self.pruning_layers(ctx.geometry.num_layers)[0], ctx.geometry.num_layers):
            cache_layer = ctx.cache_layer(layer)
            index, valid = cache_layer.visual_slots()
            ctx.evict(layer, survivors.gather(1, cache_layer.pos.gather(1, index)) | ~valid)

    def decode_layers(self, geo):
        if not self.decode_evict:
            return ()
        start = self.pruning_layers(geo.num_layers)[0] if self.prefill else 0
        return range(start, geo.num_layers)

    def on_decode_layer(self, ctx, layer: int) -> None:
        if ctx.step % self.decode_every:
            return
        attention = ctx.attention("last").probs[:, 0]
        notes = ctx.cache_layer(layer).entry_notes
        key = ctx.slot_note("key", layer) if "key" in notes else torch.zeros_like(attention, dtype=torch.bool)
        ctx.evict(layer, (attention >= self.decode_beta) | key)


def _image_features(ctx, tower) -> list[torch.Tensor] | None:
    """Per-image features of this prefill: encoded now from ``pixel_values`` (with the vision
    stage's hooks active), or as ``generate`` encoded them before prefill."""
    if ctx.inputs.get("pixel_values") is not None:
        return tower.encode(ctx.inputs)
    return ctx.session.adapter.encoded_features(ctx.inputs)
