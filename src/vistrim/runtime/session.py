"""The trimming runtime: hooks on one model instance that remove visual tokens while it runs.

A ``Session`` installs forward (pre-)hooks on the multimodal core, every decoder layer and the
final norm of *one* model instance, and removes them in ``remove()``. Nothing is patched at class
level; ``generate()`` runs unchanged.

Prefill: the core pre-hook asks the model's family where the visual tokens are and gives the
run a ``DynamicCache`` whose layers are ``TrackedLayer``. Each decoder layer's pre-hook records in
its cache layer which prompt tokens it processes and, after a cut, slices the rotary embeddings and
position ids and rebuilds the attention mask for that layer (with transformers' own mask builder,
so every attention backend works). A method acts after a layer has run; a cut shortens that
layer's output, and every deeper layer sees only the survivors, at their original positions. The
final norm's pre-hook puts the sequence back to full length (dropped tokens carry the state they
had when dropped), so logits keep the shape of ``input_ids``.

Decoding: each layer's mask comes from what its own cache holds, and a method may evict
visual entries from any cache layer after a layer has run. A step costs the runtime little beyond
what positions and masks need: layers holding the same entries share one mask, and a layer whose
entries did not change since the previous step extends that step's mask by the one key added (the
token just generated) instead of calling the mask builder again; layers no method reads during
decoding get no per-layer work.
"""

from __future__ import annotations

import inspect
import time
from functools import partial

import torch
from transformers.cache_utils import DynamicCache

from ..compat import check_transformers, clear_output_cache
from ..errors import VistrimError
from ..families import family_for
from ..methods.base import Method
from ..ops.compact import gather_rows
from .cache import TrackedLayer
from .context import DECODE, PREFILL, Context, PromptState
from .stats import RunStats, empty_stats


class Session:
    def __init__(self, model: torch.nn.Module, method) -> None:
        self.model = model
        self.method = method
        check_transformers()
        self.adapter = family_for(model)
        method.bind(self.adapter.geometry)
        self.stats: RunStats = empty_stats(method)  # replaced at every prefill
        self._ctx: Context | None = None
        self._handles: list = []
        self.state: dict = {}  # per-session state of the method and the family (e.g. hooks' records)
        self._core_params = list(inspect.signature(self.adapter.core.forward).parameters)
        geo = self.adapter.geometry
        self._prefill_layers = frozenset(method.prefill_layers(geo))
        self._decode_layers = frozenset(method.decode_layers(geo))
        # only methods that act after a whole decoding step are called (and timed) there
        self._decode_end = type(method).on_decode_end is not Method.on_decode_end
        self.renumber = getattr(method, "positions", "original") == "renumber"
        if self.renumber and not self.adapter.renumber:
            if getattr(method, "official", False):  # official rules that renumber (PyramidDrop's)
                raise VistrimError(
                    f"{method.name}.official=true renumbers positions as the released code does, which is "
                    f"not defined for {self.adapter.name} (multi-axis positions); use official=false"
                )
            raise VistrimError(
                f"{method.name}.positions=renumber is not defined for {self.adapter.name} "
                "(multi-axis positions); use positions=original"
            )
        self._flash = self.adapter.text_config._attn_implementation.startswith("flash")
        # Decoding masks of the previous step and the current one, by the live tensor they were
        # built for: {id(live): (live, cache length, mask)} (see ``_decode_mask``).
        self._last_masks: dict = {}
        self._step_masks: dict = {}

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        adapter = self.adapter
        try:
            self._handles.append(adapter.core.register_forward_pre_hook(self._core_pre, with_kwargs=True))
            self._handles.append(adapter.core.register_forward_hook(self._core_post, with_kwargs=True))
            for index, layer in enumerate(adapter.layers):
                self._handles.append(
                    layer.register_forward_pre_hook(partial(self._layer_pre, index), with_kwargs=True)
                )
                if index in self._prefill_layers or index in self._decode_layers:
                    self._handles.append(layer.register_forward_hook(partial(self._layer_post, index)))
            self._handles.append(adapter.norm.register_forward_pre_hook(self._norm_pre))
            adapter.install(self)
            self.method.install(self)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.method.uninstall(self)
        self._ctx = None

    def add_handle(self, handle) -> None:
        """For methods that hook elsewhere (e.g. the vision tower); removed with the session."""
        self._handles.append(handle)

    # ------------------------------------------------------------------ core hooks
    def _core_pre(self, module, args, kwargs):
        self._ctx = None
        kwargs = {**dict(zip(self._core_params, args)), **kwargs}
        cache = self.adapter.cache_arg.take(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            if cache.layers and isinstance(cache.layers[0], TrackedLayer):
                self._start_decode(cache, kwargs)
            return (), kwargs
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            if self.adapter.has_visual_inputs(kwargs):  # generate() moves pixels to mm_encoder_outputs
                raise VistrimError(
                    "vistrim needs input_ids to find the image tokens (inputs_embeds-only calls)"
                )
            return (), kwargs
        layout = self.adapter.layout(input_ids, kwargs)
        if not bool(layout.visual.any()):
            self.stats = empty_stats(self.method, *input_ids.shape)
            return (), kwargs
        self._start_prefill(input_ids, layout, kwargs)
        return (), kwargs

    def _start_prefill(self, input_ids: torch.Tensor, layout, kwargs: dict) -> None:
        adapter = self.adapter
        cache = adapter.cache_arg.take(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = adapter.text_config.use_cache
        if cache is None:
            cache = DynamicCache(config=adapter.text_config)
            adapter.cache_arg.put(kwargs, cache)
        adapter.check_cache(cache)
        cache.layers = [TrackedLayer() for _ in adapter.layers]
        self._last_masks, self._step_masks = {}, {}
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise VistrimError("vistrim needs a 2-D attention mask (batch, length) or none")
        batch, length = input_ids.shape
        visual = layout.visual
        live = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
        src = torch.arange(length, device=input_ids.device).expand(batch, length)
        ctx = Context(self, PREFILL, cache, attention_mask, prompt_ids=input_ids)
        ctx.layout = layout
        ctx.state = PromptState(src, live, visual & live)
        ctx.inputs = kwargs
        ctx.strip_cache = not use_cache
        self.stats = RunStats(
            method=self.method.name,
            settings=self.method.settings(),
            batch_size=batch,
            prompt_len=length,
            visual_in=ctx.state.visual.sum(-1),
        )
        self.method.on_prefill_start(ctx)
        self._ctx = ctx

    def _start_decode(self, cache, kwargs: dict) -> None:
        started = time.perf_counter()
        first = cache.layers[0]
        ctx = Context(self, DECODE, cache, kwargs.get("attention_mask"))
        ctx.step = first.generated
        # Unpatched models number new tokens by cache length; ours is shorter after pruning, so
        # continue from the original length instead.
        if kwargs.get("position_ids") is None:
            reference = kwargs.get("input_ids")
            if reference is None:
                reference = kwargs["inputs_embeds"][..., 0]
            kwargs["position_ids"] = self.adapter.continue_positions(
                kwargs,
                first.prompt_len + first.generated,
                reference.shape[1],
                reference.shape[0],
                reference.device,
            )
        mask = ctx.attention_mask
        # the prompt's own padding is in each layer's ``live``; this is about generated positions
        ctx.tail_all_live = mask is None or bool(mask[:, first.prompt_len :].all())
        self._last_masks, self._step_masks = self._step_masks, {}
        self._ctx = ctx
        self.stats.runtime_seconds_decode += time.perf_counter() - started

    def _core_post(self, module, args, kwargs, output):
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return None
        started = time.perf_counter()
        if ctx.phase == PREFILL:
            self.method.on_prefill_end(ctx)
        elif self._decode_end:
            self.method.on_decode_end(ctx)
        recorded = time.perf_counter()
        if ctx.phase == PREFILL or self._decode_end:
            self.stats.add_hook_time(ctx.phase, recorded - started)
        self.stats.record_cache(ctx.cache, after_prefill=ctx.phase == PREFILL)
        if ctx.phase == DECODE:
            self.stats.runtime_seconds_decode += time.perf_counter() - recorded
        if ctx.strip_cache:
            clear_output_cache(output)
        return output

    # ------------------------------------------------------------------ layer hooks
    def _layer_pre(self, index: int, module, args, kwargs):
        ctx = self._ctx
        if ctx is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if ctx.phase == PREFILL:
            if ctx._entry_cut is not None:  # the vision stage removed placeholders before layer 0
                ctx.frozen = torch.zeros_like(hidden)
                hidden = gather_rows(hidden, ctx._entry_cut, 1)
                args, ctx._entry_cut = (hidden, *args[1:]), None
            self._prefill_layer_geometry(ctx, index, hidden, kwargs)
        else:
            started = time.perf_counter()
            self._decode_layer_geometry(ctx, index, hidden, kwargs)
            self.stats.runtime_seconds_decode += time.perf_counter() - started
        if index in (self._prefill_layers if ctx.phase == PREFILL else self._decode_layers):
            cos, sin = kwargs["position_embeddings"]
            batch = hidden.shape[0]
            ctx._stash = (index, hidden, cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:]))
        return args, kwargs

    def _prefill_layer_geometry(self, ctx: Context, index: int, hidden, kwargs: dict) -> None:
        st = ctx.state
        ctx.cache.layers[index].describe_prompt(
            ctx.prompt_ids.shape[1], st.src, st.live, st.visual, st.all_live, st.notes
        )
        self.stats.prefill_layers.append((st.src, st.live, st.visual))
        if st.version == 0:
            return
        if ctx._rope is None or ctx._rope[0] != st.version:
            ctx._rope = (st.version, *self._prefill_positions(st, hidden, kwargs))
        kwargs["position_embeddings"], kwargs["position_ids"] = ctx._rope[1:]
        if kwargs.get("attention_mask") is not None or not st.all_live:
            kwargs["attention_mask"] = self._mask(ctx, ("prefill", st.version), st.live, hidden, index)

    def _prefill_positions(self, st: PromptState, hidden, kwargs: dict):
        """Rotary embeddings and position ids of the surviving entries: their original ones, or
        (``positions = "renumber"``) contiguous positions over the live entries."""
        if self.renumber:
            return self.adapter.renumbered_positions(hidden, st.live)
        # FlashAttention reads position ids that are not contiguous as packed sequences and would
        # split the row: it gets none (the rotary embeddings already carry the positions).
        return self.adapter.gather_positions(
            kwargs["position_embeddings"], kwargs.get("position_ids"), st.src, keep_ids=not self._flash
        )

    def _decode_layer_geometry(self, ctx: Context, index: int, hidden, kwargs: dict) -> None:
        layer = ctx.cache.layers[index]
        needs_mask = kwargs.get("attention_mask") is not None or not (layer.all_live and ctx.tail_all_live)
        if not (needs_mask or self.renumber):
            return
        length = layer.get_seq_length()
        key = (id(layer.live), length)
        if key not in ctx._masks:
            mask = self._decode_mask(ctx, layer, length, hidden, index) if needs_mask else None
            rope = None
            if self.renumber:  # each layer numbers its own live entries contiguously
                pad2d = self._decode_pad2d(ctx, layer, length, hidden)
                rope = self.adapter.renumbered_positions(hidden, pad2d)
            ctx._masks[key] = (layer.live, mask, rope)
        _, mask, rope = ctx._masks[key]
        if needs_mask:
            kwargs["attention_mask"] = mask
        if rope is not None:
            kwargs["position_embeddings"], kwargs["position_ids"] = rope

    def _decode_pad2d(self, ctx: Context, layer: TrackedLayer, length: int, hidden) -> torch.Tensor:
        """(B, keys) liveness of the layer's entries after this step's update: its prompt entries,
        then generated positions as the 2-D attention mask says."""
        return torch.cat([layer.live, ctx._tail_mask(length - layer.held_prompt + hidden.shape[1])], dim=1)

    def _decode_mask(self, ctx: Context, layer: TrackedLayer, length: int, hidden, index: int):
        """The layer's mask for this step. Built by transformers' builder, except when the layer
        held the same entries at the previous step (same ``live`` tensor, one entry shorter) and
        every generated position is attended: then the previous mask gains one column, a copy of
        the column of the token that step processed (visible to itself, so "attend" in whatever
        format the backend's mask uses), which is what the builder would return."""
        one_query = hidden.shape[1] == 1 and ctx.tail_all_live
        previous = self._last_masks.get(id(layer.live)) if one_query else None
        mask = None
        if previous is not None and previous[0] is layer.live and previous[1] + 1 == length:
            mask = extended_mask(previous[2], length + 1)
        if mask is None:
            mask = self._build_mask(ctx, self._decode_pad2d(ctx, layer, length, hidden), hidden, index)
        if one_query:
            self._step_masks[id(layer.live)] = (layer.live, length, mask)
        return mask

    def _mask(self, ctx: Context, key, pad2d, hidden, index: int):
        if key not in ctx._masks:
            ctx._masks[key] = (pad2d, self._build_mask(ctx, pad2d, hidden, index), None)
        return ctx._masks[key][1]

    def _build_mask(self, ctx: Context, pad2d, hidden, index: int):
        return self.adapter.causal_mask(ctx.cache, pad2d, hidden, index)

    def _layer_post(self, index: int, module, args, output):
        ctx = self._ctx
        if ctx is None or (ctx.phase == DECODE and index not in self._decode_layers):
            return None
        started = time.perf_counter()
        ctx.layer, ctx.output = index, output
        if ctx.phase == PREFILL:
            if index in self._prefill_layers:
                self.method.on_prefill_layer(ctx, index)
            if ctx._cut is not None:
                cut, old_src = ctx._cut
                output = ctx.take_cut(output)
                self.adapter.after_cut(ctx, index, cut, old_src)
        elif index in self._decode_layers:
            self.method.on_decode_layer(ctx, index)
        ctx._stash = ctx.output = None
        self.stats.add_hook_time(ctx.phase, time.perf_counter() - started)
        return output

    def _norm_pre(self, module, args):
        ctx = self._ctx
        if ctx is None or ctx.phase != PREFILL or ctx.frozen is None:
            return None
        hidden = args[0]
        src = ctx.state.src[..., None].expand_as(hidden)
        return (ctx.frozen.scatter(1, src, hidden),)


def extended_mask(mask, keys: int):
    """A one-query decoding mask over ``keys - 1`` keys, extended to ``keys`` by repeating its last
    column (the query's own key, always attended). Tensor masks only, (B, keys - 1) as
    FlashAttention takes them or (B, 1, 1, keys - 1); None for anything else (the caller builds)."""
    if not torch.is_tensor(mask) or mask.shape[-1] + 1 != keys or mask.dim() not in (2, 4):
        return None
    if mask.dim() == 4 and mask.shape[-2] != 1:
        return None
    return torch.cat([mask, mask[..., -1:]], dim=-1)
