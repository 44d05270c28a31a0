"""Token geometry shared by the families whose tokens fold blocks of patches (InternVL, Aya
Vision, Idefics3 / SmolVLM: tiles of pixel-shuffled patches; Mistral 3: Pixtral's patch merger),
for ``Family.token_cells`` (``vistrim show``).

- ``shuffled_cells``: where each token of a tile lies, found by running the model's own pixel
  shuffle (or patch merger) on a probe of patch indices (never a hard-coded permutation).
- ``got_ocr2_grid``: the tile grid a GotOcr2 image processor cut an image into, by that
  processor's own ``get_optimal_tiled_canvas``, checked against the tile count.
- ``stitched``: the tiles placed as LLaVA-NeXT places its views: the whole image (thumbnail or
  global tile) on the left, one empty column, the high-resolution tiles in their grid on the right.
- ``group_runs`` / ``image_span``: which runs of placeholders form one image, and its tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..errors import VistrimError
from .base import TokenCells

VIEWS_NOTE = "left: the whole image ({}); right: the high-resolution tiles"


def shuffled_cells(
    name: str, shuffle: Callable, side: int, scale: int, width: int | None = None
) -> list[int]:
    """Per token of a tile of ``side`` x ``width`` (default ``side``) patches, in the order the
    model emits them, the raster index of its cell in the (side/scale) x (width/scale) grid; one
    cell = one aligned scale x scale block of patches.

    ``shuffle`` maps patch features (1, side*width, 1) to the tile's tokens (any shape whose last
    dimension is a token's channels); it gets float64 patch indices, so each token's channels
    name the patches it folded. Refused unless the tokens are the blocks, each once."""
    width = width or side
    probe = torch.arange(side * width, dtype=torch.float64).view(1, -1, 1)
    folded = shuffle(probe)
    folded = folded.reshape(-1, folded.shape[-1])
    cells = []
    for patches in folded.round().long().tolist():
        rows, cols = {p // width // scale for p in patches}, {p % width // scale for p in patches}
        if len(set(patches)) != scale * scale or len(rows) != 1 or len(cols) != 1:
            raise VistrimError(f"{name}: a token of the pixel shuffle is not one {scale}x{scale} patch block")
        cells.append(rows.pop() * (width // scale) + cols.pop())
    if sorted(cells) != list(range((side // scale) * (width // scale))):
        raise VistrimError(f"{name}: the pixel shuffle's tokens do not cover the tile once")
    return cells


def got_ocr2_grid(name: str, image_processor, image_size, tiles: int) -> tuple[int, int]:
    """(rows, cols) of the high-resolution tiles a GotOcr2-style image processor cut an image of
    ``image_size`` (height, width) into, (0, 0) for a single tile (no thumbnail then). The grid
    is the processor's own ``get_optimal_tiled_canvas`` on its ``size`` and min/max patches;
    refused in one line when the information is missing or rows*cols + 1 thumbnail != ``tiles``."""
    if tiles == 1:
        return 0, 0
    canvas = getattr(sys.modules[type(image_processor).__module__], "get_optimal_tiled_canvas", None)
    if canvas is None or image_size is None:
        raise VistrimError(f"{name}: the tile grid needs the GotOcr2 image processor and the image's size")
    size = image_processor.size
    tile = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    height, width = (int(v) for v in image_size)
    cols, rows = canvas((height, width), tile, image_processor.min_patches, image_processor.max_patches)
    if rows * cols == 1 or rows * cols + 1 != tiles:
        raise VistrimError(
            f"{name}: {tiles} tiles are not the {cols}x{rows} grid + thumbnail the image processor "
            f"makes of a {width}x{height} image"
        )
    return rows, cols


def view_origins(grid: list[tuple[int, int]], side: int) -> list[tuple[int, int]]:
    """(top, left) in cells of tiles at grid positions (row, col), (-1, -1) for the whole-image
    view: that one at the left, one empty column, the grid right of it; a single view at (0, 0)."""
    left = side + 1 if any(r >= 0 for r, _ in grid) else 0
    return [(0, 0) if r < 0 else (r * side, left + c * side) for r, c in grid]


def stitched(
    placed: list[tuple[int, int, int]], local: list[int], side: int, cell_pixels: int, note: str
) -> TokenCells:
    """TokenCells of tiles ``placed`` ((entry, top, left) in cells, in prompt order), each
    emitting ``len(local)`` tokens, token j in cell ``local[j]`` of the tile's side x side grid."""
    rows = max(top for _, top, _ in placed) + side
    cols = max(left for _, _, left in placed) + side
    cells = [[(top + cell // side) * cols + left + cell % side] for _, top, left in placed for cell in local]
    return TokenCells(rows, cols, cells, tuple(placed), cell_pixels, note if len(placed) > 1 else "")


def group_runs(item: torch.Tensor, closes: torch.Tensor) -> torch.Tensor:
    """(B, n) the image of each placeholder (from 0 per row, -1 elsewhere), given the runs
    ``item`` (``Layout.item``) and ``closes`` (B, n) True at some placeholder of every run that
    ends an image (the runs before it, up to the previous closing run, are that image's)."""
    if int(item.max()) < 0:
        return item
    run = item.clamp(min=0)
    ends = torch.zeros(item.shape[0], int(item.max()) + 1, dtype=torch.long, device=item.device)
    ends = ends.scatter_reduce(1, run, (closes & (item >= 0)).long(), "amax")
    image_of_run = ends.cumsum(-1) - ends
    return torch.where(item >= 0, image_of_run.gather(1, run), -1)


def image_span(images: torch.Tensor, image: int) -> tuple[torch.Tensor, int]:
    """(prompt positions (row, column) of image ``image``'s placeholders, numbering images
    row-major over the batch; placeholders of the images before it)."""
    per_row = (images.max(-1).values + 1).clamp(min=0)
    numbered = torch.where(images >= 0, images + (per_row.cumsum(0) - per_row)[:, None], -1)
    where = (numbered == image).nonzero()
    if len(where) == 0:
        raise VistrimError(f"the prompts hold {int(per_row.sum())} images; there is no image {image}")
    return where, int(((numbered >= 0) & (numbered < image)).sum())


def got_ocr2_cells(
    family,
    inputs: dict,
    image: int,
    processor,
    image_size,
    local: list[int],
    side: int,
    cell_pixels: int,
    whole: str,
) -> TokenCells:
    """TokenCells of a GotOcr2-tiled image (InternVL, Aya Vision): its placeholders are whole tiles
    of ``len(local)`` tokens (``pixel_values`` entries in prompt order, the ``whole``-image view
    last when there are several), stitched in the image processor's own grid for ``image_size``;
    ``side`` = tokens per tile side."""
    layout = family.layout(inputs["input_ids"], inputs)
    where, before = image_span(family.image_index(inputs, layout, processor), image)
    tiles, first = len(where) // len(local), before // len(local)
    if tiles * len(local) != len(where) or first + tiles > inputs["pixel_values"].shape[0]:
        raise VistrimError(f"{family.name}: {len(where)} placeholders are not whole tiles of {len(local)}")
    image_processor = getattr(processor, "image_processor", None)
    rows, cols = got_ocr2_grid(family.name, image_processor, image_size, tiles)
    grid = [(t // cols, t % cols) for t in range(rows * cols)] + [(-1, -1)]
    placed = [(first + t, top, left) for t, (top, left) in enumerate(view_origins(grid[-tiles:], side))]
    return stitched(placed, local, side, cell_pixels, VIEWS_NOTE.format(whole))
