"""The family adapter interface: everything vistrim knows about one model family.

The runtime (``runtime/``), the per-pass ``Context`` and the methods never look at a model's
modules, config or token ids themselves: they ask the model's ``Family``. One file per family
(``families/llava.py``, ``families/qwen2_vl.py``, ...) subclasses ``Family``, overrides what differs
from the defaults here, registers itself with ``@register`` for the model classes it serves and
brings a ``tiny()`` builder (a random model from a config, with a processor) that the test matrix
runs every invariant on.

The defaults describe a transformers VLM whose language model is Llama-shaped (``embed_tokens``,
``layers`` of ``self_attn`` with ``q_proj`` [+ ``q_norm``] and ``input_layernorm``, ``norm``,
``rotary_emb``), with 1-D positions and a causal mask: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
InternVL and Idefics3/SmolVLM all fit, so their files mostly name paths, token ids and the
vision tower. Qwen2-VL's family overrides positions (mRoPE), Qwen3-VL's the deepstack side effect.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .. import compat
from ..errors import VistrimError

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class Geometry:
    """Language-model shapes a method may depend on, read from the model (never assumed)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    visual_token_ids: tuple[int, ...]  # placeholder ids of images (and videos) in input_ids
    family: str


@dataclass
class Layout:
    """Where the visual tokens of a prompt batch are.

    visual: (B, n) bool, the prunable visual tokens; protected: (B, n) bool, placeholder positions
    that carry visual features but are kept like text (e.g. LLaVA-NeXT's image-newline rows);
    item: (B, n) long, which image/video/tile (a run of placeholders, numbered per row from 0) each
    placeholder belongs to, -1 elsewhere.
    """

    visual: torch.Tensor
    protected: torch.Tensor
    item: torch.Tensor


@dataclass
class TokenCells:
    """Where the visual tokens of one image lie on the picture the model saw (``vistrim show``).

    The picture is cut into a ``rows`` x ``cols`` grid of cells; ``cells[k]`` lists the raster
    indices of the cells placeholder ``k`` of the image (prompt order) covers, empty for rows that
    are no part of the picture (LLaVA-NeXT's newline rows). ``tiles`` says how the picture is
    stitched from the image's ``pixel_values`` entries: ``(entry, top, left)`` per tower tile, in
    cells, ``cell_pixels`` pixels of the tile per cell (the patch size; patch size x scale where a
    token folds scale x scale patches: pixel shuffle, patch merger); empty: the image itself
    spans the grid (a processor that resizes without cropping). ``entry`` indexes
    ``pixel_values`` (N, C, H, W), or the image's own tiles of (N, T, C, H, W). ``note`` explains a
    layout of several views."""

    rows: int
    cols: int
    cells: list[list[int]]
    tiles: tuple[tuple[int, int, int], ...] = ()
    cell_pixels: int = 0
    note: str = ""


@dataclass
class VisionTower:
    """What a vision-stage method (MustDrop's merge) needs from a family's vision encoder.

    The tower runs one sequence per image (or tile): ``prefix`` tokens (CLS) followed by a
    ``grid`` (rows, cols) of patches; the projector turns the hidden states of ``feature_layer``
    (an index into the tower's hidden states, 0 = embeddings) into one language-model token per
    patch; an image enters the language model as ``rows`` placeholders.

    Tile families, whose core packs the projected tiles itself (LLaVA-NeXT, OneVision), set
    ``spatial``: after the projector each tile gets its ``rows`` patch rows back, every patch
    holding its merged token, so the core's packing runs on a coherent grid (the default pads the
    merged tokens at the end, for cores that place an image's rows as they come). ``wrap_encoder``
    ``(session, stage)`` then installs, for the session, what maps the packed rows back to tiles
    (e.g. an instance wrapper on the core's image encoder, ``runtime.vision.InstanceAttribute``,
    that arms the stage with ``stage.encoding`` and records the packed features with
    ``stage.remember``); the stage acts only inside it.
    """

    module: nn.Module
    layers: nn.ModuleList
    config: object
    grid: tuple[int, int]
    prefix: int
    feature_layer: int
    projector: nn.Module
    rows: int
    encode: Callable  # (inputs: dict) -> list of per-image feature tensors (M_i, D), hooks active
    spatial: bool = False
    wrap_encoder: Callable | None = None  # (session, stage) -> None

    def attention(self, layer: int):
        """(q_proj, k_proj, num_heads, head_dim, scale) of tower layer ``layer``."""
        attn = self.layers[layer].self_attn
        return attn.q_proj, attn.k_proj, attn.num_heads, attn.head_dim, attn.scale

    def padding_mask(self, hidden: torch.Tensor, valid: torch.Tensor):
        """The tower's attention mask when images keep different numbers of tokens (padding last)."""
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=valid)


class Family:
    """Adapter for one model family; the defaults fit Llama-shaped language models (see module doc)."""

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    tested_transformers: ClassVar[tuple[str, ...]] = compat.TESTED
    videos: ClassVar[bool] = False  # the family takes video inputs (their tokens are trimmed too)
    renumber: ClassVar[bool] = True  # contiguous renumbering of positions (``positions=renumber``)
    vision_refusal: ClassVar[str] = ""  # why MustDrop's vision stage is refused ("" = supported)
    protected_tokens: ClassVar[str] = ""  # what ``Layout.protected`` marks, for the docs
    # Modules the tiny builder needs beyond vistrim's dependencies (e.g. a processor that imports
    # torchvision); the test matrix skips the family's variants where one is missing.
    tiny_requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.core = model.model if hasattr(model, "lm_head") else model
        self.config = self.core.config
        self.lm = self.language_model()
        self.layers = self.lm.layers
        self.norm = self.lm.norm
        self.text_config = self.lm.config
        self.cache_arg = compat.CacheArgument.of(self.core.forward)
        self.check()
        attn = self.layers[0].self_attn
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.scaling = float(attn.scaling)
        text = self.text_config
        self.geometry = Geometry(
            num_layers=len(self.layers),
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=attn.head_dim,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            vocab_size=text.vocab_size,
            visual_token_ids=self.visual_token_ids(),
            family=self.name,
        )

    # ------------------------------------------------------------------ module paths and checks
    def language_model(self) -> nn.Module:
        return self.core.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids of images and videos, from the config."""
        ids = []
        for names in (("image_token_id", "image_token_index"), ("video_token_id", "video_token_index")):
            for name in names:
                value = getattr(self.config, name, None)
                if value is not None:
                    ids.append(int(value))
                    break
        if not ids:
            raise VistrimError(
                f"unsupported model {type(self.model).__name__}: no image token id in its config"
            )
        return tuple(dict.fromkeys(ids))

    def check(self) -> None:
        """Refuse, with one line, what the runtime cannot handle correctly."""
        attn_impl = self.text_config._attn_implementation
        if attn_impl not in SUPPORTED_ATTENTION:
            raise VistrimError(
                f"unsupported attention implementation {attn_impl!r} (supported: {SUPPORTED_ATTENTION})"
            )
        layer = self.layers[0]
        if not (
            hasattr(layer, "self_attn")
            and hasattr(layer.self_attn, "q_proj")
            and hasattr(layer, "input_layernorm")
        ):
            raise VistrimError(
                f"unsupported decoder layer {type(layer).__name__}: expected a Llama-style layer"
            )
        types = getattr(self.text_config, "layer_types", None) or ()
        if any(t != "full_attention" for t in types):
            raise VistrimError(
                f"{self.name}: sliding-window or hybrid attention layers are not supported "
                f"({', '.join(sorted(set(types)))})"
            )
        window = getattr(self.text_config, "sliding_window", None)
        if not types and window is not None:  # e.g. Mistral: one window for every layer, no layer_types
            raise VistrimError(
                f"{self.name}: sliding-window attention is not supported (sliding_window={window})"
            )

    def check_cache(self, cache) -> None:
        if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
            raise VistrimError(f"vistrim needs a DynamicCache without offloading, got {type(cache).__name__}")
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise VistrimError("vistrim needs a DynamicCache of full-attention layers")

    # ------------------------------------------------------------------ visual tokens
    def layout(self, input_ids: torch.Tensor, inputs: dict) -> Layout:
        """Visual tokens of a prompt batch: every placeholder, numbered by runs."""
        ids = torch.tensor(self.geometry.visual_token_ids, device=input_ids.device)
        placeholder = torch.isin(input_ids, ids)
        return Layout(placeholder, torch.zeros_like(placeholder), runs(placeholder))

    def image_index(self, inputs: dict, layout: Layout, processor=None) -> torch.Tensor:
        """(B, n) which image each placeholder belongs to (from 0 per row, -1 elsewhere), for
        ``vistrim show`` only: methods and budgets treat every run (``Layout.item``) on its own.
        Default: one run per image. Families whose image is several runs (tiles with text between
        them, rows ending in a break token) override it; the tokens that bound an image are named
        by ``processor`` (the config names only the placeholder id)."""
        return layout.item

    def token_cells(self, inputs: dict, image: int, *, processor=None, image_size=None) -> TokenCells:
        """Where the visual tokens of image ``image`` (as ``image_index`` numbers them, row-major
        over the batch; its placeholders in prompt order) lie on the picture the model saw.
        ``processor`` and the original ``image_size`` (height, width) are for families whose inputs
        do not carry the tile grid (InternVL, Aya Vision). Default (LLaVA-1.5): one token per tower
        patch of the image's own (C, H, W) entry of ``pixel_values``, in raster order; it is refused
        in one line unless every run has such an entry and the counts match (tiles, row breaks,
        merged or shuffled patches need the family's own override, as LLaVA-NeXT's and Qwen2-VL's)."""
        layout = self.layout(inputs["input_ids"], inputs)
        count = image_token_count(layout, image)
        pixels = inputs.get("pixel_values")
        patch = getattr(getattr(self.config, "vision_config", None), "patch_size", None)
        runs = int((layout.item.max(-1).values + 1).clamp(min=0).sum())
        if pixels is not None and pixels.dim() == 4 and isinstance(patch, int) and runs == pixels.shape[0]:
            rows, cols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
            if rows * cols == count:
                return TokenCells(rows, cols, [[k] for k in range(count)], ((image, 0, 0),), patch)
        raise VistrimError(f"{self.name}: where the {count} visual tokens of an image lie on it is not known")

    def has_visual_inputs(self, inputs: dict) -> bool:
        """Whether a forward call carries images or videos (pixels, or features ``generate``
        encoded before prefill)."""
        if any(inputs.get(name) is not None for name in ("pixel_values", "pixel_values_videos")):
            return True
        return any(v is not None for v in (inputs.get("mm_encoder_outputs") or {}).values())

    # ------------------------------------------------------------------ positions
    def gather_positions(self, position_embeddings, position_ids, src: torch.Tensor, keep_ids: bool):
        """Rotary embeddings (cos, sin) and position ids of the prompt entries ``src`` (B, n').

        ``position_embeddings`` (cos, sin) are (B or 1, n, d) and ``position_ids`` (B or 1, n) or
        None, as the language model passes them to its layers. ``keep_ids`` False drops the ids
        (FlashAttention would read gapped ids as packed sequences; cos/sin carry the positions).
        """
        batch = src.shape[0]
        cos, sin = (take(t.expand(batch, *t.shape[1:]), src) for t in position_embeddings)
        if position_ids is not None and keep_ids:
            position_ids = take(position_ids.expand(batch, *position_ids.shape[1:]), src)
        else:
            position_ids = None
        return (cos, sin), position_ids

    def renumbered_positions(self, hidden: torch.Tensor, live: torch.Tensor):
        """(cos, sin) and position ids numbering the ``live`` (B, n) entries contiguously (the
        last ``hidden.shape[1]`` of them are the rows the layer processes)."""
        position_ids = (live.long().cumsum(-1) - 1)[:, -hidden.shape[1] :].clamp(min=0)
        return self.rotary(hidden, position_ids), position_ids

    def continue_positions(self, kwargs: dict, start: int, length: int, batch: int, device) -> torch.Tensor:
        """Position ids for ``length`` new tokens after ``start`` original positions, for calls that
        give none (an unpatched model would number them by the cache length, which pruning shortens)."""
        return torch.arange(start, start + length, device=device)[None]

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The language model's rotary embeddings (cos, sin) for ``position_ids``."""
        return self.lm.rotary_emb(hidden, position_ids=position_ids)

    # ------------------------------------------------------------------ attention
    def query_rows(
        self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Rotated queries (B, H, m, d) of ``layer`` for the hidden-state rows (B, m, D) given, i.e.
        exactly the queries the layer's attention computed for those tokens."""
        decoder = self.layers[layer]
        attn = decoder.self_attn
        q = attn.q_proj(decoder.input_layernorm(hidden))
        q = q.view(*hidden.shape[:-1], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        return self._rope(q, q, cos, sin)[0]

    def key_rows(
        self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Rotated keys (B, Hkv, n, d) of ``layer`` for the hidden-state rows (B, n, D) given (its
        ``k_norm`` applied where it has one), as the layer's attention would compute them: for
        ranking with a layer that has not run yet (PyramidDrop's released rule). Families that
        override ``query_rows`` override this too."""
        decoder = self.layers[layer]
        attn = decoder.self_attn
        k = attn.k_proj(decoder.input_layernorm(hidden))
        k = k.view(*hidden.shape[:-1], -1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        return self._rope(k, k, cos, sin)[1]

    def causal_mask(self, cache, pad2d: torch.Tensor, hidden: torch.Tensor, layer: int):
        """The language model's attention mask for one layer whose keys are ``pad2d`` (B, k) live,
        built by transformers' own builder (so every attention backend gets its format)."""
        return compat.build_mask(
            create_causal_mask,
            config=self.text_config,
            inputs_embeds=hidden,
            attention_mask=pad2d,
            cache=cache,
            layer_idx=layer,
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    # ------------------------------------------------------------------ side effects
    def install(self, session) -> None:
        """Hooks outside the decoder layers the family needs (e.g. Qwen3-VL's deepstack)."""

    def next_layer_input(self, ctx, layer: int, output: torch.Tensor) -> torch.Tensor:
        """Prefill: what layer ``layer + 1`` will receive, given layer ``layer``'s ``output`` (before
        any cut); the same tensor unless the language model adds something between layers."""
        return output

    def after_cut(self, ctx, layer: int, index: torch.Tensor | None, old_src: torch.Tensor) -> None:
        """Prefill: entries were cut after ``layer`` (``index`` gathers the survivors from the
        previous state, None if only masked); keep state outside the layers in step."""

    # ------------------------------------------------------------------ vision stage
    def vision_stage_refusal(self) -> str:
        """Why this model's vision stage is refused ("" = supported): the family's reason, or one
        the family finds in this model's configuration (e.g. a tower of another kind)."""
        return self.vision_refusal

    def vision_tower(self) -> VisionTower:
        """The vision encoder for vision-stage methods, or a one-line refusal."""
        raise VistrimError(f"{self.name}: the vision stage is not supported ({self.vision_stage_refusal()})")

    def image_placeholders(self, input_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        """(B, n) the placeholders of images (visual and protected rows; not videos'), for a vision
        stage that replaces each image's rows. Default: every placeholder of the layout."""
        return layout.visual | layout.protected

    def encoded_features(self, inputs: dict, modality: str = "image") -> list[torch.Tensor] | None:
        """Per-image features ``generate`` encoded before prefill (``mm_encoder_outputs``)."""
        encoded = (inputs.get("mm_encoder_outputs") or {}).get(modality)
        return None if encoded is None else list(encoded.pooler_output)

    # ------------------------------------------------------------------ measurement
    def vision_sequences(self, inputs: dict) -> int:
        """Sequences the vision tower runs for ``inputs`` (one per image here; families that cut an
        image into tiles or take video frames count those), for bench's FLOPs."""
        pixels = inputs.get("pixel_values")
        return 0 if pixels is None else int(pixels.shape[0])

    def flops_shape(self):
        """The widths ``bench``'s FLOPs formulas need (``bench.flops.FlopsShape``)."""
        from ..bench.flops import FlopsShape

        geo = self.geometry
        return FlopsShape(
            hidden=geo.hidden_size,
            kv_width=geo.num_kv_heads * geo.head_dim,
            intermediate=geo.intermediate_size,
            vision_hidden=0,
            vision_intermediate=0,
            vision_layers=0,
            image_size=0,
            patch_size=1,
        )

    # ------------------------------------------------------------------ tests and demos
    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """(model, processor): a tiny random model of the family built from a config, offline."""
        raise NotImplementedError(f"{cls.name} has no tiny builder")

    @classmethod
    def tiny_variants(cls) -> dict[str, Callable]:
        """Named tiny builders (``seed``, ``attn_implementation``) the test matrix runs: one per model
        class the family serves that differs in what the runtime sees (e.g. Qwen2-VL and 2.5)."""
        return {cls.name: cls.tiny}


def runs(placeholder: torch.Tensor) -> torch.Tensor:
    """(B, n) index of the run of consecutive True entries each True entry belongs to (from 0 in
    each row), -1 for False entries."""
    start = placeholder & ~torch.nn.functional.pad(placeholder, (1, 0))[:, :-1]
    return torch.where(placeholder, start.long().cumsum(-1) - 1, -1)


def image_token_count(layout: Layout, image: int) -> int:
    """Placeholders of image ``image`` (runs numbered row-major over the batch)."""
    per_row = (layout.item.max(-1).values + 1).clamp(min=0)
    first = per_row.cumsum(0) - per_row
    numbered = torch.where(layout.item >= 0, layout.item + first[:, None], -1)
    count = int((numbered == image).sum())
    if count == 0:
        raise VistrimError(f"the prompts hold {int(per_row.sum())} images; there is no image {image}")
    return count


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, n, ...) gathered along dim 1 at index (B, k)."""
    shape = list(index.shape) + [1] * (x.dim() - 2)
    return x.gather(1, index.view(shape).expand(*index.shape, *x.shape[2:]))


# ---------------------------------------------------------------------- registry
FAMILIES: dict[str, type[Family]] = {}
_BY_CLASS: dict[str, type[Family]] = {}
# Model classes vistrim knows and refuses, with the reason (one line each).
REFUSED: dict[str, str] = {}


def register(cls: type[Family]) -> type[Family]:
    FAMILIES[cls.name] = cls
    for name in cls.model_classes:
        _BY_CLASS[name] = cls
    return cls


def refuse(reason: str, *class_names: str) -> None:
    for name in class_names:
        REFUSED[name] = reason


def family_class(model: nn.Module) -> type[Family]:
    name = type(model).__name__
    if name in REFUSED:
        raise VistrimError(f"unsupported model {name}: {REFUSED[name]}")
    if name not in _BY_CLASS:
        raise VistrimError(f"unsupported model {name} (supported: {', '.join(sorted(_BY_CLASS))})")
    return _BY_CLASS[name]


def family_for(model: nn.Module) -> Family:
    """The adapter of ``model``'s family (chosen by its class), or a one-line refusal."""
    return family_class(model)(model)
