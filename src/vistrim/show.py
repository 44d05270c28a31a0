"""A picture of what a method keeps: the visual tokens each decoder layer processed, on the image.

The picture the model saw is cut into its family's token grid (``Family.token_cells``): the
tower's patch grid for LLaVA; the merged patch grid for Qwen2-VL and Mistral 3 (Pixtral); for
LLaVA-NeXT, OneVision, InternVL, Aya Vision and Idefics3 / SmolVLM the whole image (base tile,
thumbnail or global image) on the left and the high-resolution tiles stitched into their grid on
the right; newline rows cover nothing; a pixel-shuffled or merged token is one cell. The image's
placeholders are all the runs ``Family.image_index`` puts in it, in prompt order (one run per
image, or one per tile or row: Aya Vision, Idefics3, Mistral 3); ``token_cells`` also gets the
processor and the original image size, which InternVL and Aya Vision need for their tile grid.
One image per prompt: several images, and videos, are refused in one line. One panel per run of
consecutive layers that processed the same visual tokens in prefill, dropped cells dimmed; for
methods that evict while decoding (ST³'s annealing, MustDrop's cache stage) a second group of
panels shows what each layer's cache held after the last step. MustDrop's merged windows (several
cells, one token) are outlined and its key set is marked with a dot; cells no token covers (the
padding an unpad crop removed, the gap between views) fade to white. ``show`` returns the picture
and a plain record of every panel (layers, kept tokens and cells, pixel box) that ``vistrim show``
writes next to it.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont

from .api import trim
from .compat import output_cache
from .errors import VistrimError
from .families import family_for
from .families.base import TokenCells

PANEL_PIXELS = 192  # a panel's longer side, before rounding to whole cells
DIM = (24, 24, 32)  # dropped cells are blended towards this colour
DIM_ALPHA = 0.75
BLANK_ALPHA = 0.85  # cells no token covers (cropped padding, the gap between views) fade to white
MERGED = (255, 200, 0)
KEY = (230, 30, 60)


@dataclass
class TokenMap:
    """The visual tokens of one image and the grid cells each covers."""

    rows: int
    cols: int
    positions: list[int]  # prompt position of each placeholder of the image, in order
    cells: list[list[int]]  # per placeholder, the raster indices of the cells it covers
    key: list[bool]  # per placeholder, whether it is in a protected key set
    merged: list[bool] = field(default_factory=list)  # per placeholder, a token a vision stage merged
    note: str = ""  # how the grid is laid out, when it holds several views (LLaVA-NeXT)
    tokens: int = 0  # picture tokens of the image as the processor placed them (newline rows excluded)

    def cells_of(self, positions) -> list[int]:
        index = {p: k for k, p in enumerate(self.positions)}
        return sorted({c for p in positions for c in self.cells[index[int(p)]]})

    def tokens_of(self, positions) -> list[int]:
        index = {p: k for k, p in enumerate(self.positions)}
        return sorted(index[int(p)] for p in positions)

    @property
    def used(self) -> set[int]:
        """Cells some token covers (the rest: padding the processor cropped, the gap between views)."""
        return {c for cells in self.cells for c in cells}


@dataclass
class Panel:
    kind: str  # "input", "prefill" or "cache"
    layers: tuple[int, int]  # first and last layer shown (inclusive)
    tokens: list[int]  # kept placeholders (indices into TokenMap.positions)
    cells: list[int]
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    label: str = ""


@dataclass
class Shown:
    picture: Image.Image
    answer: str
    token_map: TokenMap
    panels: list[Panel] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def record(self) -> dict:
        """Every number behind the picture (for the JSON next to the PNG)."""
        tm = self.token_map
        return {
            "answer": self.answer,
            "grid": [tm.rows, tm.cols],
            "visual_tokens": len(tm.positions),
            "picture_tokens": tm.tokens,
            "merged_tokens": [cells for cells, merged in zip(tm.cells, tm.merged) if merged],
            "note": tm.note,
            "key_tokens": [k for k, key in enumerate(tm.key) if key],
            "panels": [
                {
                    "kind": p.kind,
                    "layers": list(p.layers),
                    "label": p.label,
                    "kept_tokens": p.tokens,
                    "kept_cells": p.cells,
                    "box": list(p.box),
                }
                for p in self.panels
            ],
            "stats": self.summary,
        }


def token_map(family, inputs: dict, stats, processor=None, image_size=None) -> tuple[TokenMap, TokenCells]:
    """Placeholders of the single image of a one-prompt batch (every run ``Family.image_index``
    puts in it, prompt order) and the cells they cover; ``processor`` and the original
    ``image_size`` (height, width) go to ``Family.token_cells``."""
    input_ids = inputs["input_ids"]
    layout = family.layout(input_ids, inputs)
    images = family.image_index(inputs, layout, processor) if input_ids.shape[0] == 1 else None
    if images is None or int(images.max()) != 0:
        raise VistrimError("show needs one prompt with one image")
    grid = family.token_cells(inputs, 0, processor=processor, image_size=image_size)
    positions = (images[0] == 0).nonzero().squeeze(-1).tolist()
    if len(grid.cells) != len(positions):
        raise VistrimError(f"{family.name}: {len(grid.cells)} token cells for {len(positions)} placeholders")
    cells = [list(c) for c in grid.cells]
    tokens = sum(1 for c in cells if c)
    merged = [False] * len(positions)
    if stats.vision_patch_tokens:  # a vision stage merged patches: token k covers several cells
        patch_token = stats.vision_patch_tokens[0].tolist()
        if len(patch_token) != grid.rows * grid.cols or any(c != [k] for k, c in enumerate(cells)):
            raise VistrimError(
                f"{family.name}: the tower's {len(patch_token)} patches are not the token grid"
            )
        cells = [[] for _ in positions]
        for patch, token in enumerate(patch_token):
            cells[token].append(patch)
        merged = [len(c) > 1 for c in cells]
    elif stats.vision_row_tokens:  # tile families: rows showing one merged token are one token
        shown = stats.vision_row_tokens[0].tolist()
        first: dict[int, int] = {}
        for k, token in enumerate(shown):
            if token < 0 or token not in first:
                first.setdefault(token, k)
                continue
            cells[first[token]] += cells[k]
            cells[k] = []
            merged[first[token]] = True
    key = [False] * len(positions)
    if stats.key_tokens:
        for k, flag in enumerate(stats.key_tokens[0].tolist()):
            key[k] = bool(flag)
    return TokenMap(grid.rows, grid.cols, positions, cells, key, merged, grid.note, tokens), grid


def seen_picture(inputs: dict, processor, image: Image.Image, grid: TokenCells) -> Image.Image:
    """The picture as the tower saw it: the de-normalised tiles of ``pixel_values`` stitched as
    ``grid.tiles`` says (resize, crop and padding included); else the image itself (processors that
    resize without cropping, e.g. Qwen2-VL's, whose token grid spans the whole image)."""
    pixels = inputs.get("pixel_values")
    image_processor = getattr(processor, "image_processor", None)
    if pixels is None or not grid.tiles or image_processor is None or pixels.dim() not in (4, 5):
        return image.convert("RGB")
    step = grid.cell_pixels
    canvas = Image.new("RGB", (grid.cols * step, grid.rows * step), "white")
    for entry, top, left in grid.tiles:
        tile = pixels[entry] if pixels.dim() == 4 else pixels[0, entry]
        canvas.paste(_denormalised(tile, image_processor), (left * step, top * step))
    return canvas


def _denormalised(pixels: torch.Tensor, image_processor) -> Image.Image:
    x = pixels.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=x.dtype)[:, None, None]
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / float(getattr(image_processor, "rescale_factor", 1 / 255))
    array = x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def show(
    model,
    processor,
    inputs: dict,
    image: Image.Image,
    method,
    *,
    max_new_tokens: int = 16,
    max_panels: int = 8,
) -> Shown:
    """Generate under ``method`` and draw what each layer kept (see the module docstring)."""
    family = family_for(model)
    with trim(model, method) as session, torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
        )
    stats = session.stats
    if stats.num_layers == 0:
        raise VistrimError("the prompt holds no image token")
    tm, grid = token_map(family, inputs, stats, processor, (image.height, image.width))
    prompt_len = inputs["input_ids"].shape[1]
    answer = processor.batch_decode(output.sequences[:, prompt_len:], skip_special_tokens=True)[0].strip()
    prefill = [stats.kept_positions(layer)[0].tolist() for layer in range(stats.num_layers)]
    cache = [_cache_positions(layer) for layer in output_cache(output).layers]
    picture_rows = [k for k, cells in enumerate(grid.cells) if cells]
    panels = [Panel("input", (0, stats.num_layers - 1), picture_rows, sorted(tm.used))]
    panels += _panels("prefill", prefill, tm, max_panels)
    if any(sorted(c) != sorted(p) for c, p in zip(cache, prefill)):
        panels += _panels("cache", cache, tm, max_panels)
    title = f"{_short(method)} on {family.name}\nanswer: {answer or '(empty)'}"
    picture = draw(seen_picture(inputs, processor, image, grid), tm, panels, title, stats.decode_steps)
    return Shown(picture, answer, tm, panels, stats.summary())


def _short(method) -> str:
    """The method with the settings that differ from its defaults (all of them are in the JSON)."""
    defaults = type(method)().settings()
    changed = {k: v for k, v in method.settings().items() if defaults.get(k) != v}
    return f"{method.name}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def _cache_positions(layer) -> list[int]:
    live = layer.live[0] & layer.visual[0]
    return layer.pos[0][live].tolist()


def _panels(kind: str, per_layer: list[list[int]], tm: TokenMap, max_panels: int) -> list[Panel]:
    """One panel per run of consecutive layers holding the same tokens; evenly thinned (first and
    last run kept) when there are more runs than ``max_panels``."""
    runs: list[tuple[int, int, list[int]]] = []
    for layer, positions in enumerate(per_layer):
        kept = sorted(positions)
        if runs and runs[-1][2] == kept:
            runs[-1] = (runs[-1][0], layer, kept)
        else:
            runs.append((layer, layer, kept))
    if len(runs) > max_panels:
        picks = sorted({round(i * (len(runs) - 1) / (max_panels - 1)) for i in range(max_panels)})
        runs = [runs[i] for i in picks]
    return [Panel(kind, (a, b), tm.tokens_of(kept), tm.cells_of(kept)) for a, b, kept in runs]


# ---------------------------------------------------------------------- drawing
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def draw(seen: Image.Image, tm: TokenMap, panels: list[Panel], title: str, steps: int) -> Image.Image:
    """The panels in rows of four under a title (method, answer, legend); sets each panel's box."""
    cell = max(2, math.ceil(PANEL_PIXELS / max(tm.rows, tm.cols)))
    width, height = tm.cols * cell, tm.rows * cell
    base = seen.convert("RGB").resize((width, height), Image.BICUBIC)
    font, small = _font(14), _font(12)
    margin, label_h, header_h, per_row = 12, 22, 20, 4
    sections = [[p for p in panels if p.kind != "cache"], [p for p in panels if p.kind == "cache"]]
    sections = [s for s in sections if s]
    grid_rows = sum(math.ceil(len(s) / per_row) for s in sections)
    canvas_w = max(margin + min(per_row, max(map(len, sections))) * (width + margin), 420)
    text = title + (f"\n{_legend(tm)}" if _legend(tm) else "")
    lines = [w for line in text.splitlines() for w in textwrap.wrap(line, canvas_w // 8) or [""]]
    title_h = 12 + 18 * len(lines)
    canvas = Image.new(
        "RGB",
        (canvas_w, title_h + len(sections) * header_h + grid_rows * (height + label_h + margin)),
        "white",
    )
    pen = ImageDraw.Draw(canvas)
    pen.multiline_text((margin, 8), "\n".join(lines), fill="black", font=font, spacing=4)
    y = title_h
    for section in sections:
        heading = (
            f"visual entries each layer's KV cache held after {steps} decoding step{'s' * (steps != 1)}"
            if section[0].kind == "cache"
            else "visual tokens each decoder layer processed in prefill (dimmed: dropped)"
        )
        pen.text((margin, y), heading, fill=(60, 60, 60), font=small)
        y += header_h
        for start in range(0, len(section), per_row):
            for column, panel in enumerate(section[start : start + per_row]):
                x = margin + column * (width + margin)
                canvas.paste(_panel_image(base, tm, panel, cell), (x, y))
                panel.box = (x, y, x + width, y + height)
                panel.label = _label(panel, tm.tokens)
                pen.text((x, y + height + 4), panel.label, fill="black", font=small)
            y += height + label_h + margin
    return canvas


def _label(panel: Panel, total: int) -> str:
    a, b = panel.layers
    if panel.kind == "input":
        return f"image: {total} tokens"
    layers = f"layer {a}" if a == b else f"layers {a}-{b}"
    return f"{layers}: {len(panel.tokens)} of {total}"


def _legend(tm: TokenMap) -> str:
    parts = [tm.note] if tm.note else []
    if len(tm.used) < tm.rows * tm.cols:
        parts.append("white: no token")
    if any(tm.merged):
        parts.append("box: merged window (one token)")
    if any(tm.key):
        parts.append("dot: key token")
    return "; ".join(parts)


def _panel_image(base: Image.Image, tm: TokenMap, panel: Panel, cell: int) -> Image.Image:
    image = base.copy()
    kept, used = set(panel.cells), tm.used
    dim, blank = Image.new("RGB", (cell, cell), DIM), Image.new("RGB", (cell, cell), "white")
    for index in range(tm.rows * tm.cols):
        if index in kept:
            continue
        r, c = divmod(index, tm.cols)
        box = (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
        shade, alpha = (dim, DIM_ALPHA) if index in used else (blank, BLANK_ALPHA)
        image.paste(Image.blend(image.crop(box), shade, alpha), box[:2])
    pen = ImageDraw.Draw(image)
    for cells, key, merged in zip(tm.cells, tm.key, tm.merged):
        if not cells:  # a newline row, or a placeholder left empty by a vision-stage merge
            continue
        rows, cols = zip(*(divmod(i, tm.cols) for i in cells))
        if merged:
            pen.rectangle(
                (min(cols) * cell, min(rows) * cell, (max(cols) + 1) * cell - 1, (max(rows) + 1) * cell - 1),
                outline=MERGED,
                width=max(1, cell // 8),
            )
        if key:
            cx, cy = (min(cols) + max(cols) + 1) * cell / 2, (min(rows) + max(rows) + 1) * cell / 2
            radius = max(1.5, cell / 6)
            pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=KEY)
    return image
