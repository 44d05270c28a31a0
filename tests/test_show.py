"""``vistrim show``: the picture's kept cells are the tokens ``session.stats`` says each layer
processed, on every family's token layout; the layouts of pixel-shuffled tiles (InternVL, Aya
Vision, Idefics3) and Pixtral rows (Mistral 3) put each token where its pixels are; MustDrop's
merge map and key set; one-line errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import run_cli, shape_images
from PIL import Image

from vistrim import VistrimError, build, trim
from vistrim.cli.run import build_inputs
from vistrim.families import family_for
from vistrim.families.aya_vision import AyaVision
from vistrim.families.idefics3 import Idefics3
from vistrim.families.internvl import InternVL
from vistrim.families.llava_next import LlavaNext
from vistrim.families.llava_onevision import LlavaOnevision
from vistrim.families.mistral3 import Mistral3
from vistrim.families.qwen2_vl import Qwen2VL
from vistrim.ops.mustdrop import grid_windows, merge_plan, merge_windows, patch_tokens, window_similarity
from vistrim.show import show


def reference_tokens(model, processor, image, method) -> tuple[list[list[int]], torch.Tensor]:
    """Per layer, the placeholder indices (among the image's, in prompt order) of the visual
    tokens that layer processed in prefill, read from session.stats of an independent run."""
    inputs = build_inputs(processor, image, "what color is the shape ?")
    with trim(model, method) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    family = family_for(model)
    images = family.image_index(inputs, family.layout(inputs["input_ids"], inputs), processor)
    positions = (images[0] == 0).nonzero().squeeze(-1).tolist()
    index = {p: k for k, p in enumerate(positions)}
    stats = session.stats
    kept = [
        sorted(index[p] for p in stats.kept_positions(layer)[0].tolist()) for layer in range(stats.num_layers)
    ]
    return kept, stats.prefill_visual()[:, 0]


def shown_matching_stats(model, processor, inputs, image, method):
    """``show`` under ``method``, its prefill panels checked against an independent run's
    session.stats (kept placeholders and counts, layer by layer)."""
    shown = show(model, processor, inputs, image, method, max_new_tokens=2)
    record = shown.record()
    kept, counts = reference_tokens(model, processor, image, method)
    prefill = [p for p in record["panels"] if p["kind"] == "prefill"]
    for panel in prefill:
        for layer in range(panel["layers"][0], panel["layers"][1] + 1):
            assert panel["kept_tokens"] == kept[layer] and len(kept[layer]) == int(counts[layer])
    return shown, record, prefill, counts


def check_picture(picture: Image.Image, record: dict) -> None:
    """Inside each panel a kept cell is pixel-identical to the same cell of the image panel, a
    dropped one is not (it is dimmed); the record's kept cells decide which is which."""
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    rows, cols = record["grid"]
    first, *panels = record["panels"]
    used = set(first["kept_cells"])  # the input panel: every cell some token covers
    assert first["kind"] == "input" and used

    def cell(box, index):
        x0, y0, x1, y1 = box
        h, w = (y1 - y0) // rows, (x1 - x0) // cols
        r, c = divmod(index, cols)
        return pixels[y0 + r * h + 1 : y0 + (r + 1) * h - 1, x0 + c * w + 1 : x0 + (c + 1) * w - 1]

    for panel in panels:
        kept = set(panel["kept_cells"])
        for index in range(rows * cols):
            same = np.array_equal(cell(panel["box"], index), cell(first["box"], index))
            assert same == (index in kept or index not in used), (panel["label"], index)


def test_show_cli_png_and_json_match_session_stats(capsys, tiny, tmp_path):
    image_path = tmp_path / "shape.png"
    shape_images(1, seed=3)[0].save(image_path)
    out = tmp_path / "fastv.png"
    code, stdout, err = run_cli(
        capsys,
        "show",
        "--model",
        "tiny",
        "--image",
        str(image_path),
        "--prompt",
        "what color is the shape ?",
        "--method",
        "fastv",
        "--set",
        "keep=0.25",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "answer:" in stdout and out.is_file()
    record = json.loads(out.with_suffix(".json").read_text())
    model, processor = tiny
    kept, counts = reference_tokens(
        model, processor, Image.open(image_path).convert("RGB"), build("fastv", keep=0.25)
    )
    assert record["grid"] == [8, 8] and record["visual_tokens"] == 64
    prefill = [p for p in record["panels"] if p["kind"] == "prefill"]
    covered = [layer for p in prefill for layer in range(p["layers"][0], p["layers"][1] + 1)]
    assert covered == list(range(len(kept)))  # every layer is in exactly one panel
    for panel in prefill:
        for layer in range(panel["layers"][0], panel["layers"][1] + 1):
            assert panel["kept_tokens"] == kept[layer] and len(panel["kept_tokens"]) == int(counts[layer])
        assert panel["kept_cells"] == panel["kept_tokens"]  # LLaVA: token k is cell k of the patch grid
    assert [len(p["kept_tokens"]) for p in prefill] == [64, 16]
    check_picture(Image.open(out), record)


def test_show_mustdrop_marks_merged_windows_key_set_and_cache(tiny):
    model, processor = tiny
    image = shape_images(1, seed=1)[0]
    method = build("mustdrop", budget=0.2)
    inputs = build_inputs(processor, image, "what color is the shape ?")
    shown = show(model, processor, inputs, image, method, max_new_tokens=3)
    record = shown.record()
    kept, counts = reference_tokens(model, processor, image, method)
    tm = shown.token_map
    # the merge map: tokens entering the language model cover every patch exactly once
    covered = sorted(c for cells in tm.cells for c in cells)
    assert covered == list(range(64)) and record["merged_tokens"]
    entering = sum(1 for cells in tm.cells if cells)
    assert entering == int(counts[0]) < 64
    assert all(len(cells) == 9 for cells in record["merged_tokens"])  # 3x3 windows
    assert record["key_tokens"] and all(tm.cells[k] for k in record["key_tokens"])
    for panel in (p for p in record["panels"] if p["kind"] == "prefill"):
        for layer in range(panel["layers"][0], panel["layers"][1] + 1):
            assert panel["kept_tokens"] == kept[layer]
        assert panel["kept_cells"] == sorted(c for k in panel["kept_tokens"] for c in tm.cells[k])
    # MustDrop's cache stage keeps fewer entries than some layers processed: a cache section
    cache = [p for p in record["panels"] if p["kind"] == "cache"]
    final = record["stats"]["cache_visual_final"]
    assert cache and [len(p["kept_tokens"]) for p in cache] == [final[p["layers"][0]] for p in cache]
    check_picture(shown.picture, record)


@pytest.mark.parametrize("size", [(48, 32), (32, 32)])
def test_show_qwen_layout_follows_image_grid(size):
    """Qwen2.5-VL: t*(h/2)*(w/2) tokens per image in raster order over the merged grid."""
    model, processor = Qwen2VL.tiny(version="2.5")
    image = Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8"))
    inputs = build_inputs(processor, image, "what color is the shape ?")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    grid = family_for(model).token_cells(inputs, 0)
    rows, cols = grid.rows, grid.cols
    assert (rows, cols) == (h // 2, w // 2) and rows * cols * t == len(grid.cells) and not grid.tiles
    if size[0] != size[1]:
        assert rows != cols
    method = build("fastv", keep=0.5)
    shown, record, prefill, counts = shown_matching_stats(model, processor, inputs, image, method)
    assert len(prefill[-1]["kept_tokens"]) < rows * cols
    check_picture(shown.picture, record)


def test_default_token_cells_are_the_patch_grid_or_refused(tiny):
    model, _ = tiny
    family = family_for(model)
    (token,) = family.geometry.visual_token_ids
    size = model.config.vision_config.image_size
    pixels = torch.zeros(1, 3, size, size)
    side = size // model.config.vision_config.patch_size
    grid = {"input_ids": torch.tensor([[1] + [token] * side * side + [2]]), "pixel_values": pixels}
    cells = family.token_cells(grid, 0)
    assert (cells.rows, cells.cols) == (side, side) and cells.cells == [[k] for k in range(side * side)]
    assert cells.tiles == ((0, 0, 0),) and cells.cell_pixels == model.config.vision_config.patch_size
    wrong = {"input_ids": torch.tensor([[1] + [token] * 10 + [2]]), "pixel_values": pixels}
    with pytest.raises(VistrimError, match="where the 10 visual tokens of an image lie on it is not known"):
        family.token_cells(wrong, 0)
    two_runs = {"input_ids": torch.tensor([[1] + [token] * 3 + [2] + [token] * 3]), "pixel_values": pixels}
    with pytest.raises(VistrimError, match="not known"):  # two runs for one pixel tensor (row breaks)
        family.token_cells(two_runs, 0)
    with pytest.raises(VistrimError, match="there is no image 1"):
        family.token_cells(grid, 1)


def test_patch_tokens_name_the_merged_token_of_every_patch():
    torch.manual_seed(0)
    patches = torch.randn(3, 36, 8)
    patches[:, :3] = patches[:, :1]  # make a few windows similar
    windows = grid_windows(6, 6, 3)
    similarity = window_similarity(patches, windows)
    for plan in (
        merge_plan(similarity, 0.0),
        merge_plan(similarity, 2.0),
        merge_plan(similarity, -1.0, limit=2),
    ):
        for merged_first in (False, True):
            tokens, valid, source = merge_windows(
                patches, windows, plan, similarity, merged_first=merged_first
            )
            token = patch_tokens(windows, plan, source, 36)
            for b in range(3):
                assert sorted(set(token[b].tolist())) == list(range(int(valid[b].sum())))
                for k in range(int(valid[b].sum())):
                    members = (token[b] == k).nonzero().squeeze(-1)
                    torch.testing.assert_close(tokens[b, k], patches[b, members].mean(0))


def test_show_bad_input_is_one_line(capsys, tmp_path):
    image_path = tmp_path / "x.png"
    shape_images(1)[0].save(image_path)
    code, _, err = run_cli(
        capsys, "show", "--model", "tiny", "--image", str(image_path), "--prompt", "what ?", "--out", "x.jpg"
    )
    assert code == 2 and err.strip() == "vistrim: error: --out must name a .png file, got x.jpg"
    code, _, err = run_cli(
        capsys,
        "show",
        "--model",
        "tiny",
        "--image",
        str(image_path),
        "--prompt",
        "what ?",
        "--method",
        "nope",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown method 'nope'" in err


TILE_FAMILIES = {"llava_next": LlavaNext, "llava_onevision": LlavaOnevision}


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("family_name", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", [(32, 32), (40, 24), (24, 40)])
def test_tile_layouts_place_every_token_once(family_name, size):
    """LLaVA-NeXT / OneVision: the base tile's cells on the left, the high-resolution tiles on the
    right; newline rows cover nothing, one newline per high-resolution row; every cell some token
    covers is covered once; exact copies cover one cell each (NeXT always, OneVision unless it
    interpolates, where the grid's rows share its cells)."""
    model, processor = TILE_FAMILIES[family_name].tiny()
    family = family_for(model)
    inputs = build_inputs(processor, random_image(*size), "what color is the shape ?")
    grid = family.token_cells(inputs, 0)
    layout = family.layout(inputs["input_ids"], inputs)
    protected = layout.protected[0][layout.item[0] == 0]
    assert len(grid.cells) == len(protected)
    assert all(not cells for cells, newline in zip(grid.cells, protected) if newline)
    assert all(cells for cells, newline in zip(grid.cells, protected) if not newline)
    covered = [c for cells in grid.cells for c in cells]
    assert len(covered) == len(set(covered))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    base = {r * grid.cols + c for r in range(side) for c in range(side)}
    assert base <= set(covered)  # the whole base tile
    high = sorted(set(covered) - base)
    assert all(c % grid.cols > side for c in high)  # right of the gap column
    high_rows = {c // grid.cols for c in high}
    interpolated = any(len(cells) > 1 for cells in grid.cells)
    assert interpolated == (family_name == "llava_onevision" and size == (32, 32))
    if not interpolated:  # the unpad crop keeps a rectangle of whole rows, a newline after each
        assert int(protected.sum()) == len(high_rows)
        cols_used = {c % grid.cols for c in high}
        assert len(high) == len(high_rows) * len(cols_used)
        if size[0] > size[1]:
            assert len(cols_used) > len(high_rows)
        elif size[0] < size[1]:
            assert len(cols_used) < len(high_rows)
    assert [entry for entry, _, _ in grid.tiles] == list(range(family.tiles(inputs)[0]))


@pytest.mark.parametrize("family_name", ["llava_next", "llava_onevision"])
def test_show_tile_layouts_match_session_stats(family_name):
    model, processor = TILE_FAMILIES[family_name].tiny()
    image = random_image(40, 24, seed=2)
    method = build("fastv", keep=0.5)
    inputs = build_inputs(processor, image, "what color is the shape ?")
    shown, record, prefill, counts = shown_matching_stats(model, processor, inputs, image, method)
    assert record["picture_tokens"] == int(counts[0]) and "high-resolution tiles" in record["note"]
    check_picture(shown.picture, record)


@pytest.mark.parametrize("family_name", ["llava_next", "llava_onevision"])
def test_show_tile_layouts_mark_mustdrop_merges_per_tile(family_name):
    """MustDrop's vision stage on tiles: each merged token covers the cells of every row showing it,
    tokens entering layer 0 cover every picture cell once, merged windows stay inside one tile."""
    model, processor = TILE_FAMILIES[family_name].tiny()
    image = random_image(40, 24, seed=4)
    method = build("mustdrop", window=2, merge_threshold=0.0)
    inputs = build_inputs(processor, image, "what color is the shape ?")
    shown = show(model, processor, inputs, image, method, max_new_tokens=2)
    record = shown.record()
    kept, counts = reference_tokens(model, processor, image, method)
    tm = shown.token_map
    entering = [k for k, cells in enumerate(tm.cells) if cells]
    assert len(entering) == int(counts[0]) < record["picture_tokens"]
    covered = sorted(c for cells in tm.cells for c in cells)
    assert covered == sorted(tm.used) and len(covered) == len(set(covered))
    assert record["merged_tokens"] and all(len(cells) > 1 for cells in record["merged_tokens"])
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size

    def tile(cell):
        r, c = divmod(cell, tm.cols)
        return (0, 0) if c < side else (r // side, (c - side - 1) // side + 1)

    assert all(len({tile(c) for c in cells}) == 1 for cells in record["merged_tokens"])
    assert record["key_tokens"] and all(tm.cells[k] for k in record["key_tokens"])
    for panel in (p for p in record["panels"] if p["kind"] == "prefill"):
        for layer in range(panel["layers"][0], panel["layers"][1] + 1):
            assert panel["kept_tokens"] == kept[layer]
    check_picture(shown.picture, record)


# ---------------------------------------------------------------------- pixel-shuffled tiles, Pixtral rows
SHUFFLED = {
    "internvl": InternVL.tiny,
    "aya_vision": AyaVision.tiny,
    "idefics3": Idefics3.tiny,
    "smolvlm": lambda: Idefics3.tiny(smolvlm=True),
}
GOT_OCR2 = ["internvl", "aya_vision"]  # the tile grid comes from the image processor, not the prompt
# GotOcr2 (up to 4 tiles): one tile; 2x1, 1x2 and 3x1 grids; Idefics3 (up to 3x3): 3x3, 3x2, 2x3, 3x2
SIZES = [(32, 32), (64, 32), (32, 64), (100, 40)]


def smooth_image(width: int, height: int) -> Image.Image:
    """Red grows to the right, green downwards, blue along the diagonal: any misplaced tile shows."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, (x + y) / (width + height)], -1)
    return Image.fromarray((rgb * 255).astype("uint8"))


def cells_and_positions(builder, size):
    model, processor = builder()
    family = family_for(model)
    image = smooth_image(*size)
    inputs = build_inputs(processor, image, "what color is the shape ?")
    grid = family.token_cells(inputs, 0, processor=processor, image_size=(image.height, image.width))
    images = family.image_index(inputs, family.layout(inputs["input_ids"], inputs), processor)
    positions = (images[0] == 0).nonzero().squeeze(-1)
    return model, processor, image, inputs, grid, positions


@pytest.mark.parametrize("family_name", list(SHUFFLED))
@pytest.mark.parametrize("size", SIZES)
def test_shuffled_tile_layouts_place_every_token_once(family_name, size):
    """Every placeholder of the image covers one cell, inside the grid, each cell once; the tiles
    (one per pixel_values entry, in order) do not overlap; several tiles: the global view on the
    left, the grid right of an empty column."""
    model, _, _, inputs, grid, positions = cells_and_positions(SHUFFLED[family_name], size)
    visual = family_for(model).layout(inputs["input_ids"], inputs).visual[0]
    assert len(grid.cells) == len(positions) == int(visual.sum())  # every placeholder is the image's
    assert all(len(cells) == 1 for cells in grid.cells)
    covered = [c for cells in grid.cells for c in cells]
    assert len(covered) == len(set(covered)) and all(0 <= c < grid.rows * grid.cols for c in covered)
    pixels = inputs["pixel_values"]
    entries = pixels.shape[0] if pixels.dim() == 4 else pixels.shape[1]
    assert [entry for entry, _, _ in grid.tiles] == list(range(entries))
    side = round((len(covered) / len(grid.tiles)) ** 0.5)
    boxes = [
        {(top + i) * grid.cols + left + j for i in range(side) for j in range(side)}
        for _, top, left in grid.tiles
    ]
    assert sum(map(len, boxes)) == len(set().union(*boxes)) == len(covered) and set(covered) == set().union(
        *boxes
    )
    if len(grid.tiles) > 1:
        assert grid.tiles[-1][1:] == (0, 0) and all(left > side for _, _, left in grid.tiles[:-1])
        assert "high-resolution tiles" in grid.note


class _Stop(Exception):
    pass


def language_model_inputs(model, inputs: dict) -> torch.Tensor:
    """(1, n, D) the embeddings the language model receives (image features scattered in), with
    the vision tower's attention outputs zeroed: every tower feature then depends on its own patch
    only, so a pixel's change reaches exactly the tokens built from it."""
    family = family_for(model)
    seen = {}

    def stop(_module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]
        raise _Stop

    def local(_module, _args, output):
        return (
            (torch.zeros_like(output[0]), *output[1:])
            if isinstance(output, tuple)
            else torch.zeros_like(output)
        )

    handles = [family.lm.register_forward_pre_hook(stop, with_kwargs=True)]
    for name, module in model.named_modules():
        if "vision" in name and type(module).__name__.endswith("Attention"):
            handles.append(module.register_forward_hook(local))
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen["embeds"]


def perturbed_tokens(model, inputs, grid, positions, cell: int) -> list[int]:
    """Placeholders (of the image) whose features change when the pixels of ``cell`` change."""
    r, c = divmod(cell, grid.cols)
    step = grid.cell_pixels
    pixels = inputs["pixel_values"].clone()
    for entry, top, left in grid.tiles:
        tile = pixels[entry] if pixels.dim() == 4 else pixels[0, entry]
        rows, cols = tile.shape[-2] // step, tile.shape[-1] // step
        if top <= r < top + rows and left <= c < left + cols:
            y, x = (r - top) * step, (c - left) * step
            tile[:, y : y + step, x : x + step] += 0.5
    before = language_model_inputs(model, inputs)[0, positions]
    after = language_model_inputs(model, {**inputs, "pixel_values": pixels})[0, positions]
    return ((after - before).abs().amax(-1) > 1e-4).nonzero().squeeze(-1).tolist()


@pytest.mark.parametrize("family_name", list(SHUFFLED))
@pytest.mark.parametrize("size", [(32, 32), (100, 40)])
def test_shuffled_tile_layouts_put_each_token_where_its_pixels_are(family_name, size):
    """Changing the pixels under one cell of one tile (two corner cells of every tile, which a
    transposed or reordered layout would swap) changes exactly the token the layout puts there."""
    model, _, _, inputs, grid, positions = cells_and_positions(SHUFFLED[family_name], size)
    owner = {cells[0]: k for k, cells in enumerate(grid.cells)}
    side = round((len(grid.cells) / len(grid.tiles)) ** 0.5)
    for _, top, left in grid.tiles:
        for i, j in ((0, side - 1), (side - 1, 0)):
            cell = (top + i) * grid.cols + left + j
            assert perturbed_tokens(model, inputs, grid, positions, cell) == [owner[cell]]


@pytest.mark.parametrize("family_name", list(SHUFFLED))
@pytest.mark.parametrize("size", SIZES[1:])
def test_tile_grids_follow_the_processors_crop_order(family_name, size):
    """The stitched high-resolution tiles of the shown picture are the image resized to the grid
    (the processor crops the resized image in raster order); the global view is the whole image."""
    from vistrim.show import seen_picture

    _, processor, image, inputs, grid, _ = cells_and_positions(SHUFFLED[family_name], size)
    seen = np.asarray(seen_picture(inputs, processor, image, grid)).astype(float)
    step, side = grid.cell_pixels, grid.tiles[-1][1] + round((len(grid.cells) / len(grid.tiles)) ** 0.5)
    left = min(left for _, _, left in grid.tiles[:-1])
    high = seen[:, left * step :]
    expected = np.asarray(image.resize((high.shape[1], high.shape[0]), Image.BICUBIC)).astype(float)
    assert np.abs(high - expected).mean() < 6
    whole = seen[: side * step, : side * step]
    expected = np.asarray(image.resize((whole.shape[1], whole.shape[0]), Image.BICUBIC)).astype(float)
    assert np.abs(whole - expected).mean() < 6


@pytest.mark.parametrize("family_name", list(SHUFFLED))
def test_show_shuffled_tile_layouts_match_session_stats(family_name):
    model, processor = SHUFFLED[family_name]()
    image = random_image(100, 40, seed=2)
    inputs = build_inputs(processor, image, "what color is the shape ?")
    shown, record, prefill, counts = shown_matching_stats(
        model, processor, inputs, image, build("fastv", keep=0.5)
    )
    tokens = len(shown.token_map.positions)
    assert record["picture_tokens"] == int(counts[0]) == tokens and "high-resolution tiles" in record["note"]
    assert len(prefill[-1]["kept_tokens"]) < tokens
    check_picture(shown.picture, record)


@pytest.mark.parametrize("family_name", GOT_OCR2)
def test_got_ocr2_tile_grids_are_refused_without_the_image_or_on_a_mismatch(family_name):
    model, processor, image, inputs, _, _ = cells_and_positions(SHUFFLED[family_name], (100, 40))
    family = family_for(model)
    with pytest.raises(VistrimError, match="needs the GotOcr2 image processor and the image's size"):
        family.token_cells(inputs, 0, processor=processor)
    with pytest.raises(VistrimError, match="4 tiles are not the 2x1 grid"):  # the size of another image
        family.token_cells(inputs, 0, processor=processor, image_size=(40, 80))


def test_idefics3_tiles_are_refused_without_the_processor():
    model, processor, _, inputs, _, _ = cells_and_positions(SHUFFLED["idefics3"], (64, 32))
    family = family_for(model)
    with pytest.raises(VistrimError, match="needs the processor's global image tag"):
        family.image_index(inputs, family.layout(inputs["input_ids"], inputs))
    with pytest.raises(VistrimError, match="token cells need pixel_values and the processor's tokenizer"):
        family.token_cells(inputs, 0)


needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="Mistral 3's tiny processor (Pixtral) needs torchvision",
)


@needs_torchvision
@pytest.mark.parametrize("size", SIZES)
def test_pixtral_rows_place_every_token_once(size):
    """Mistral 3: one run of placeholders per row of merged patch cells ([IMG_BREAK] between them,
    [IMG_END] after the last), all of them the image's; run r holds the cells of grid row r."""
    model, _, _, inputs, grid, positions = cells_and_positions(Mistral3.tiny, size)
    layout = family_for(model).layout(inputs["input_ids"], inputs)
    height, width = inputs["image_sizes"][0].tolist()
    step = grid.cell_pixels
    assert (grid.rows, grid.cols) == (height // step, width // step) and grid.tiles == ((0, 0, 0),)
    assert len(positions) == int(layout.visual.sum()) == grid.rows * grid.cols
    assert int(layout.item.max()) + 1 == grid.rows
    runs = layout.item[0, positions].tolist()
    assert sorted(c for cells in grid.cells for c in cells) == list(range(grid.rows * grid.cols))
    assert all(cells[0] // grid.cols == run for cells, run in zip(grid.cells, runs))


@needs_torchvision
@pytest.mark.parametrize("size", [(32, 32), (100, 40)])
def test_pixtral_rows_put_each_token_where_its_pixels_are(size):
    model, _, _, inputs, grid, positions = cells_and_positions(Mistral3.tiny, size)
    for k, cells in enumerate(grid.cells):
        assert perturbed_tokens(model, inputs, grid, positions, cells[0]) == [k]


@needs_torchvision
def test_show_pixtral_rows_match_session_stats():
    model, processor = Mistral3.tiny()
    image = random_image(40, 32, seed=2)
    inputs = build_inputs(processor, image, "what color is the shape ?")
    shown, record, prefill, counts = shown_matching_stats(
        model, processor, inputs, image, build("fastv", keep=0.5)
    )
    tokens = len(shown.token_map.positions)
    assert record["picture_tokens"] == int(counts[0]) == tokens > len(prefill[-1]["kept_tokens"])
    check_picture(shown.picture, record)


@pytest.mark.parametrize("family_name", ["internvl", "aya_vision", "idefics3"])
def test_show_refuses_several_images_and_videos_on_tile_families(family_name):
    """Two images in one prompt (several runs each for Aya Vision and Idefics3: image_index groups
    them into two images) and video inputs are refused in one line."""
    from vistrim.show import token_map

    model, processor = SHUFFLED[family_name]()
    family = family_for(model)
    text = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what ?"}],
            }
        ],
        add_generation_prompt=True,
    )
    two = processor(images=[smooth_image(64, 32), smooth_image(32, 32)], text=[text], return_tensors="pt")
    images = family.image_index(two, family.layout(two["input_ids"], two), processor)
    assert int(images.max()) == 1
    with pytest.raises(VistrimError, match="^show needs one prompt with one image$"):
        token_map(family, two, None, processor, (32, 64))
    if family_name == "internvl":
        one = build_inputs(processor, smooth_image(32, 32), "what ?")
        with pytest.raises(VistrimError, match="token cells are known for image-only prompts"):
            family.token_cells({**one, "pixel_values_videos": torch.zeros(1)}, 0, processor=processor)
