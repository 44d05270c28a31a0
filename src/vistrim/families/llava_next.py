"""LLaVA-NeXT (1.6) and LLaVA-NeXT-Video: ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``
and ``LlavaNextVideoForConditionalGeneration`` / ``LlavaNextVideoModel`` (CLIP tower with a CLS token,
anyres tiles, a Llama-shaped language model: Vicuna, Mistral without sliding window, Llama 3, Qwen).

- Visual tokens: the ``image_token_id`` (and ``video_token_id``) placeholders. An image is cut into
  tiles (the whole image resized, then the tiles of the best ``image_grid_pinpoints`` resolution),
  each one CLIP sequence; after the projector the core packs them (``pack_image_features``): the
  base tile, then the other tiles as one patch grid, unpadded to the image's aspect ratio, with the
  learned ``image_newline`` embedding after each grid row. The newline rows sit at image-token
  positions but are not patches: they are ``Layout.protected`` (kept like text, not counted as
  visual, never dropped).
- Videos (NeXT-Video): each frame is one CLIP sequence, pooled 2x2 (``vision_resampler``) and
  projected; every video token is prunable, budgets count image and video tokens together.
- Vision stage (MustDrop's merge and key set): per tile, natively laid out. Each tile is one CLIP
  sequence; the merge windows and the key set's CLS attention work inside it as on LLaVA-1.5
  (windows never cross tiles, as in the released code, which runs each crop as its own sequence).
  After the projector every tile gets its P patch rows back, each patch holding the token it
  merged into (``VisionTower.spatial``), so the core's own ``pack_image_features`` (grid, unpad
  crop, newline rows) runs on a coherent grid and keep-all is the unpatched model bit for bit.
  ``image_sizes`` are read where the tower runs by an instance attribute over the core's
  ``get_image_features`` (same signature; ``generate`` calls it before prefill; removed exactly on
  exit): it runs the core's packing on an index probe, so every packed row is known as (tile,
  patch), and records each packed image by its feature tensor. At prefill each (tile, merged
  token) keeps one placeholder, the first packed row showing it that survived the crop; its other
  rows leave before the first decoder layer (a token the crop removed entirely never appears);
  newline rows stay, protected. The key set is the top ``key_ratio`` of an image's surviving
  tokens by their tile's CLS attention. Budgets: in budget mode a tile of an image of n visual
  tokens merges at most as many windows as leave it budget * P / n tokens. Video frames (NeXT-Video)
  pass through the tower untouched (the stage acts only inside ``get_image_features``); the
  prefill filter and the cache prune them.
  The released code's flat layout (crops concatenated, no unpadding, no newlines) is not offered:
  it feeds the language model a different input than the model's own packing, so even with nothing
  merged it is not the unpatched model, and no setting could make that exact and testable against
  it; the native layout keeps the model's input and merges inside each tile as the released code
  does. Refused in one line at ``trim()`` (``vision=true``; ``auto`` skips the stage): a tower that
  is not CLIP/SigLIP-like, several ``vision_feature_layer`` concatenated, a feature strategy that
  does not match the tower (``default`` needs a CLS token, ``full`` none); a call of
  ``get_image_features`` with another feature layer or strategy than the config's fails in one line.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from ..errors import VistrimError
from ..runtime.vision import InstanceAttribute, VisionRecord, exact_rows, index_probe, packed_rows
from .base import Family, Layout, TokenCells, VisionTower, image_token_count, register
from .llava import feature_index

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Tiny models: 16x16 tiles of 4x4 patches; an image is a base tile plus up to 2x2 tiles.
TINY_TILE, TINY_PATCH = 16, 4
TINY_PINPOINTS = [[16, 32], [32, 16], [32, 32]]


@register
class LlavaNext(Family):
    name = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    protected_tokens = (
        "image_newline rows: the rows the core's pack_image_features appends after each row of an "
        "image's tile grid (OneVision: also after each video), found from the model's own packing "
        "(pack_image_features run on a probe with the prompt's image_sizes, or the encoded features "
        "equal to image_newline when generate encoded the images before prefill)"
    )

    # ------------------------------------------------------------------ visual tokens
    def layout(self, input_ids: torch.Tensor, inputs: dict) -> Layout:
        """Image and video placeholders; the newline rows among them are protected. Each image or
        video is one item, split by the lengths its features have (the order the core scatters
        them in), so adjacent images stay apart."""
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        protected = torch.zeros_like(visual)
        starts = torch.zeros_like(visual)
        for modality, token_id in self._modalities():
            placeholder = input_ids == token_id
            if not bool(placeholder.any()):
                continue
            newlines = self._newlines(modality, inputs, int(placeholder.sum()))
            flags, first = self._place(placeholder, newlines, modality)
            visual |= placeholder & ~flags
            protected |= flags
            starts |= first
        item = torch.where(visual | protected, starts.long().cumsum(-1) - 1, -1)
        return Layout(visual, protected, item)

    def _modalities(self) -> list[tuple[str, int]]:
        found = [(m, getattr(self.config, f"{m}_token_id", None)) for m in ("image", "video")]
        return [(modality, int(token_id)) for modality, token_id in found if token_id is not None]

    def _place(self, placeholder: torch.Tensor, newlines: list[torch.Tensor], modality: str):
        """Newline flags (B, n) and first-entry flags (B, n) of the items whose per-item newline
        flags are ``newlines``, laid over ``placeholder`` in row-major order (as the core scatters)."""
        lengths = torch.tensor([len(n) for n in newlines], device=placeholder.device)
        count = int(placeholder.sum())
        if int(lengths.sum()) != count:
            raise VistrimError(
                f"{self.name}: the prompts hold {count} {modality} placeholders, but the "
                f"{modality}s give {int(lengths.sum())} features"
            )
        rows, cols = placeholder.nonzero(as_tuple=True)
        begin = lengths.cumsum(0) - lengths
        last = begin + lengths - 1
        if bool(((rows[begin] != rows[last]) | (cols[last] - cols[begin] + 1 != lengths)).any()):
            raise VistrimError(f"{self.name}: each {modality}'s placeholders must be consecutive in one row")
        flags = torch.zeros_like(placeholder)
        flags[placeholder] = torch.cat(newlines).to(placeholder.device)
        first = torch.zeros_like(placeholder)
        first[rows[begin], cols[begin]] = True
        return flags, first

    def _newlines(self, modality: str, inputs: dict, count: int) -> list[torch.Tensor]:
        """Per image (video), which of its feature rows are the newline embedding."""
        encoded = self.encoded_features(inputs, modality)
        if encoded is not None:  # generate encoded them before prefill: the rows that are the newline
            newline = self.core.image_newline
            return [(f == newline.to(f.device, f.dtype)).all(-1) for f in encoded]
        if modality == "image":
            if inputs.get("pixel_values") is None or inputs.get("image_sizes") is None:
                raise VistrimError(
                    f"{self.name}: image placeholders need pixel_values and image_sizes (or encoded features)"
                )
            return self._pack_probe(inputs)
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            raise VistrimError(f"{self.name}: video placeholders need pixel_values_videos")
        if count % videos.shape[0]:
            raise VistrimError(f"{self.name}: {count} video placeholders for {videos.shape[0]} videos")
        return [self._video_newlines(count // videos.shape[0]) for _ in range(videos.shape[0])]

    def _video_newlines(self, length: int) -> torch.Tensor:
        """NeXT-Video appends no newline to a video."""
        return torch.zeros(length, dtype=torch.bool)

    def _pack_probe(self, inputs: dict) -> list[torch.Tensor]:
        """The model's own packing run on a probe (every tile row 0, the newline 1; zeros stay zeros
        through unpadding and OneVision's interpolation): which packed rows are newlines."""
        sizes = torch.as_tensor(inputs["image_sizes"]).cpu()
        rows = self._tile_rows()
        probe = [torch.zeros(tiles, rows, 1, dtype=torch.float64) for tiles in self.tiles(inputs)]
        packed = self._pack(probe, sizes, torch.ones(1, dtype=torch.float64))
        return [p[:, 0] == 1 for p in packed]

    def _tile_rows(self) -> int:
        """Feature rows of one tile: the patch grid, plus a CLS the feature strategy keeps."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        prefix = int(hasattr(self.tower_model().embeddings, "class_embedding"))
        return side * side + prefix - int(self.config.vision_feature_select_strategy == "default")

    def _pack(self, probe, sizes, newline, call: dict | None = None):
        return self.core.pack_image_features(
            probe,
            sizes,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=newline,
        )[0]

    def tiles(self, inputs: dict) -> list[int]:
        """Tower sequences (tiles) of each image, by the modeling module's own function."""
        count = sys.modules[type(self.core).__module__].image_size_to_num_patches
        return [
            count(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in torch.as_tensor(inputs["image_sizes"]).cpu()
        ]

    def token_cells(self, inputs: dict, image: int, *, processor=None, image_size=None) -> TokenCells:
        """Two views side by side, one cell per tower patch: the base tile (the whole image at
        tile size) on the left, the high-resolution tiles stitched into their grid on the right.
        Each packed row is placed by the core's own packing run on a coordinate probe (every patch
        carries its cell's row and column; newlines stay zero), so the unpad crop and OneVision's
        interpolation place rows as they place features. Rows that are exact copies of one patch
        cover its cell; the rows of an interpolated grid share its cells, nearest row first."""
        if inputs.get("pixel_values_videos") is not None:
            raise VistrimError(f"{self.name}: token cells are known for image-only prompts")
        if inputs.get("pixel_values") is None or inputs.get("image_sizes") is None:
            raise VistrimError(f"{self.name}: token cells need pixel_values and image_sizes")
        layout = self.layout(inputs["input_ids"], inputs)
        count = image_token_count(layout, image)
        tiles = self.tiles(inputs)
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        if self._tile_rows() != side * side:
            raise VistrimError(f"{self.name}: a tile's feature rows are not its patch grid (CLS kept)")
        sizes = torch.as_tensor(inputs["image_sizes"]).cpu()
        shape = sys.modules[type(self.core).__module__].get_anyres_image_grid_shape
        if tiles[image] > 1:
            high, wide = shape(sizes[image].tolist(), self.config.image_grid_pinpoints, vision.image_size)
        else:  # a sample of several images (OneVision): the base tile alone
            high, wide = 0, 0
        left = side + 1 if high else 0  # one empty column between the views
        rows, cols = max(side, high * side), left + wide * side
        r = torch.arange(side * side, dtype=torch.float64).div(side, rounding_mode="floor")
        c = torch.arange(side * side, dtype=torch.float64) % side
        # (top, left) in cells of every tile: the base tile, then the others in raster order
        placed = [(0, 0)] + [(t // wide * side, left + t % wide * side) for t in range(tiles[image] - 1)]
        probe = [torch.zeros(n, side * side, 3, dtype=torch.float64) for n in tiles]
        for t, (top, first) in enumerate(placed):
            probe[image][t] = torch.stack([r + top, c + first, torch.ones_like(r)], -1)
        packed = self._pack(probe, sizes, torch.zeros(3, dtype=torch.float64))[image]
        if len(packed) != count:
            raise VistrimError(f"{self.name}: image {image} has {count} tokens, its packing {len(packed)}")
        y, x, mark = packed.unbind(-1)
        real = mark > 0.5
        exact = real & (y == y.round()) & (x == x.round())
        cells: list[list[int]] = [[] for _ in range(count)]
        for k in exact.nonzero().squeeze(-1).tolist():
            cells[k].append(int(y[k]) * cols + int(x[k]))
        blended = (real & ~exact).nonzero().squeeze(-1)
        if len(blended):  # an interpolated grid: its cells go to the nearest of its rows
            ys, xs = y[blended] / mark[blended], x[blended] / mark[blended]
            taken = {cell for row in cells for cell in row}
            area = [
                (i, j)
                for i in range(int(ys.min().floor()), int(ys.max().ceil()) + 1)
                for j in range(int(xs.min().floor()), int(xs.max().ceil()) + 1)
                if j >= left and i * cols + j not in taken
            ]
            points = torch.tensor(area, dtype=torch.float64)
            distance = (points[:, None, 0] - ys) ** 2 + (points[:, None, 1] - xs) ** 2
            for (i, j), nearest in zip(area, distance.argmin(-1).tolist()):
                cells[int(blended[nearest])].append(i * cols + j)
        note = "left: the whole image (base tile); right: the high-resolution tiles" if high else ""
        placed_tiles = tuple((t, top, first) for t, (top, first) in enumerate(placed))
        return TokenCells(rows, cols, cells, placed_tiles, vision.patch_size, note)

    def tower_model(self):
        tower = self.core.vision_tower
        return getattr(tower, "vision_model", tower)

    def image_placeholders(self, input_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        return (input_ids == int(self.config.image_token_id)) & (layout.visual | layout.protected)

    # ------------------------------------------------------------------ vision stage
    def vision_stage_refusal(self) -> str:
        config, tower = self.config, self.tower_model()
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is None or not hasattr(tower, "embeddings") or not hasattr(layers[0], "self_attn"):
            return f"it needs a CLIP- or SigLIP-like tower, this model's is {type(tower).__name__}"
        if feature_index(config.vision_feature_layer, config.vision_config.num_hidden_layers) is None:
            return "it needs a single vision_feature_layer (this model concatenates several)"
        cls = hasattr(tower.embeddings, "class_embedding")
        strategy = config.vision_feature_select_strategy
        if (strategy == "default") != cls:
            return (
                "it needs vision_feature_select_strategy='default' on a tower with a CLS token and 'full' "
                f"on one without (this model: {strategy!r}, {'a' if cls else 'no'} CLS token)"
            )
        return ""

    def vision_tower(self) -> VisionTower:
        refusal = self.vision_stage_refusal()
        if refusal:
            raise VistrimError(f"{self.name}: the vision stage is not supported ({refusal})")
        config, tower = self.config, self.tower_model()
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return VisionTower(
            module=self.core.vision_tower,
            layers=tower.encoder.layers,
            config=vision,
            grid=(side, side),
            prefix=int(hasattr(tower.embeddings, "class_embedding")),
            feature_layer=feature_index(config.vision_feature_layer, vision.num_hidden_layers),
            projector=self.core.multi_modal_projector,
            rows=side * side,
            encode=self._encode,
            spatial=True,
            wrap_encoder=self._wrap_encoder,
        )

    # get_image_features arguments the core's forward passes on (OneVision adds batch_num_images)
    _ENCODER_INPUTS = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )

    def _encode(self, inputs: dict) -> list[torch.Tensor]:
        """The images of a forward call, encoded as the core would (through the session's wrapper)."""
        kwargs = {name: inputs[name] for name in self._ENCODER_INPUTS if inputs.get(name) is not None}
        return list(self.core.get_image_features(**kwargs, return_dict=True).pooler_output)

    def _wrap_encoder(self, session, stage) -> None:
        """An instance attribute over the core's ``get_image_features`` (for the session; the same
        signature, so ``generate`` passes it the same arguments): it reads the tiles of each image
        from ``image_sizes``, runs the core's packing on an index probe, arms the stage (sequences
        of images whose grid the packing interpolates do not merge, base tiles excepted), calls the
        core's own function and records each packed image: one placeholder per merged token."""
        original = self.core.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            call = signature.bind(*args, **kwargs).arguments
            self._check_encoder_call(call)
            sizes = torch.as_tensor(call["image_sizes"]).cpu()
            tiles = self.tiles({"image_sizes": sizes, "batch_num_images": call.get("batch_num_images")})
            patches = stage.tower.rows
            ids = self._pack(index_probe(tiles, patches), sizes, torch.zeros(2, dtype=torch.float64), call)
            exact = [bool((exact_rows(rows) | (rows[:, 0] == 0)).all()) for rows in ids]
            mergeable = torch.cat([torch.arange(n) < (n if ok else 1) for n, ok in zip(tiles, exact)])
            visual = [int((rows[:, 0] != 0).sum()) for rows in ids]  # what a budget counts per image
            counted = torch.tensor([v for v, n in zip(visual, tiles) for _ in range(n)])
            with stage.encoding(mergeable, counted):
                output = original(*args, **kwargs)
                run = stage.last
            packed = getattr(output, "pooler_output", None)
            if run is not None and packed is not None and len(packed) == len(tiles):
                records = self._packed_records(run, ids, mergeable, tiles, sizes, call, patches)
                stage.remember(list(packed), records)
            return output

        session.add_handle(InstanceAttribute(self.core, "get_image_features", get_image_features))

    def _check_encoder_call(self, call: dict) -> None:
        config = self.config
        for name in ("vision_feature_layer", "vision_feature_select_strategy"):
            value = call.get(name)
            if value is not None and value != getattr(config, name):
                raise VistrimError(
                    f"{self.name}: the vision stage runs with the config's {name}="
                    f"{getattr(config, name)!r}, not {value!r}"
                )

    def _packed_records(self, run, ids, mergeable, tiles, sizes, call, patches) -> list[VisionRecord]:
        """Per packed image: its token rows, newline rows, and the importance of each row's token
        (the run's per-patch importance put through the core's packing, interpolation included)."""
        importance = None
        if run.cls is not None:
            probe = list(run.cls.detach().double().cpu()[..., None].split(tiles))
            importance = self._pack(probe, sizes, torch.zeros(1, dtype=torch.float64), call)
        patch_token = None if run.patch_token is None else run.patch_token.cpu()
        records, start = [], 0
        for image, count in enumerate(tiles):
            valid, newline, shown = packed_rows(ids[image], patch_token, mergeable, patches)
            cls = None if importance is None else importance[image][:, 0].float().masked_fill(~valid, 0)[None]
            merged = None if run.merged is None else run.merged[start : start + count].sum().reshape(1).cpu()
            records.append(
                VisionRecord(
                    valid[None],
                    cls,
                    run.tokens_per_layer,
                    merged,
                    len(valid),
                    protected=newline[None],
                    row_token=shown[None],
                )
            )
            start += count
        return records

    # ------------------------------------------------------------------ measurement
    def vision_sequences(self, inputs: dict) -> int:
        sequences = sum(self.tiles(inputs)) if inputs.get("pixel_values") is not None else 0
        videos = inputs.get("pixel_values_videos")
        return sequences + (0 if videos is None else videos.shape[0] * videos.shape[1])

    def flops_shape(self):
        from ..bench.flops import FlopsShape

        geo, vision = self.geometry, self.config.vision_config
        return FlopsShape(
            hidden=geo.hidden_size,
            kv_width=geo.num_kv_heads * geo.head_dim,
            intermediate=geo.intermediate_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
        )

    # ------------------------------------------------------------------ tests and demos
    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """A CLIP tower (16x16 tiles, patch 4: 16 patches and a CLS) and a 4-layer Llama (GQA 4/2);
        a 32x32 image is a base tile and 2x2 tiles: 16 + 8x8 patches and 8 newline rows."""
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaNextProcessor,
        )

        return _tiny(
            cls,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaNextProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            seed,
            attn_implementation,
        )


@register
class LlavaNextVideo(LlavaNext):
    name = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")
    videos = True

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """The NeXT tiny model with the video path (frames pooled 2x2: 4 tokens a frame)."""
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaNextVideoConfig,
            LlavaNextVideoForConditionalGeneration,
            LlavaNextVideoProcessor,
        )

        return _tiny(
            cls,
            LlavaNextVideoConfig,
            LlavaNextVideoForConditionalGeneration,
            LlavaNextVideoProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            seed,
            attn_implementation,
        )


def _tiny(family, config_cls, model_cls, processor_cls, vision_cls, text_cls, seed, attn_implementation):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ..models.processors import image_only
    from ..models.tiny import _WORDS, seeded, tiny_text
    from ..models.tokenizer import word_level_tokenizer

    video = family.videos
    tokenizer = word_level_tokenizer(
        _WORDS, ("<video>",) if video else (), {"video_token": "<video>"} if video else None
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TINY_TILE},
        crop_size={"height": TINY_TILE, "width": TINY_TILE},
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    processor = image_only(
        processor_cls,
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = vision_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=TINY_TILE,
        patch_size=TINY_PATCH,
        projection_dim=32,
    )
    text = text_cls(**tiny_text(tokenizer))
    ids = {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}
    if video:
        ids["video_token_id"] = tokenizer.convert_tokens_to_ids("<video>")
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=TINY_PINPOINTS,
        image_seq_length=(TINY_TILE // TINY_PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **ids,
    )
    return seeded(model_cls, config, seed, attn_implementation, tokenizer), processor
