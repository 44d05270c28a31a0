"""``vistrim show``: the picture's kept cells are the tokens ``session.stats`` says each layer
processed, on every family's token layout; MustDrop's merge map and key set; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, shape_images
from PIL import Image

from vistrim import VistrimError, build, trim
from vistrim.cli.run import build_inputs
from vistrim.families import family_for
from vistrim.families.llava_next import LlavaNext
from vistrim.families.llava_onevision import LlavaOnevision
from vistrim.families.qwen2_vl import Qwen2VL
from vistrim.ops.mustdrop import grid_windows, merge_plan, merge_windows, patch_tokens, window_similarity
from vistrim.show import show


def reference_tokens(model, processor, image, method) -> tuple[list[list[int]], torch.Tensor]:
    """Per layer, the placeholder indices (among the image's, in prompt order) of the visual
    tokens that layer processed in prefill, read from session.stats of an independent run."""
    inputs = build_inputs(processor, image, "what color is the shape ?")
    with trim(model, method) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    layout = family_for(model).layout(inputs["input_ids"], inputs)
    positions = (layout.item[0] == 0).nonzero().squeeze(-1).tolist()
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
