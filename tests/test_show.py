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


def check_picture(picture: Image.Image, record: dict) -> None:
    """Inside each panel a kept cell is pixel-identical to the same cell of the image panel, a
    dropped one is not (it is dimmed); the record's kept cells decide which is which."""
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    rows, cols = record["grid"]
    first, *panels = record["panels"]
    assert first["kind"] == "input" and len(first["kept_cells"]) == rows * cols

    def cell(box, index):
        x0, y0, x1, y1 = box
        h, w = (y1 - y0) // rows, (x1 - x0) // cols
        r, c = divmod(index, cols)
        return pixels[y0 + r * h + 1 : y0 + (r + 1) * h - 1, x0 + c * w + 1 : x0 + (c + 1) * w - 1]

    for panel in panels:
        kept = set(panel["kept_cells"])
        for index in range(rows * cols):
            same = np.array_equal(cell(panel["box"], index), cell(first["box"], index))
            assert same == (index in kept), (panel["label"], index)


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
    rows, cols, cells = family_for(model).token_cells(inputs, 0)
    assert (rows, cols) == (h // 2, w // 2) and rows * cols * t == cells.numel()
    if size[0] != size[1]:
        assert rows != cols
    method = build("fastv", keep=0.5)
    shown = show(model, processor, inputs, image, method, max_new_tokens=2)
    record = shown.record()
    kept, counts = reference_tokens(model, processor, image, method)
    prefill = [p for p in record["panels"] if p["kind"] == "prefill"]
    for panel in prefill:
        for layer in range(panel["layers"][0], panel["layers"][1] + 1):
            assert panel["kept_tokens"] == kept[layer] and len(kept[layer]) == int(counts[layer])
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
    rows, cols, cells = family.token_cells(grid, 0)
    assert (rows, cols) == (side, side) and cells.tolist() == list(range(side * side))
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
