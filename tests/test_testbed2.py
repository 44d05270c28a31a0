"""Test-bed 2 (small shapes on photos, 576 visual tokens): the data generator, the training script
and the shipped model."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this file may touch the network
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vistrim.data import shapes
from vistrim.data.easyvqa import build_prompt, fixed_subset
from vistrim.evaluate.harness import accuracy_summary, answer, item_batches, score
from vistrim.models.testbed2 import TESTBED2_DIR, TINY2_SIZE, build_testbed2, load_testbed2

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_testbed2.py"
SHIPPED = (TESTBED2_DIR / "model.safetensors").exists()
needs_model = pytest.mark.skipif(not SHIPPED, reason="test-bed 2 weights not shipped in this checkout")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_testbed2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- data generator
def test_generator_is_deterministic_for_a_seed():
    first, again = shapes.eval_items(6, seed=3), shapes.eval_items(6, seed=3)
    assert [(i.question, i.answer, i.size) for i in first] == [(i.question, i.answer, i.size) for i in again]
    assert np.array_equal(np.asarray(first[0].load_image()), np.asarray(again[0].load_image()))
    other = shapes.eval_items(6, seed=4)
    assert [i.scene for i in other] != [i.scene for i in first]
    assert first[0].load_image().size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_splits_use_disjoint_photos_and_streams():
    assert not set(shapes.TRAIN_PHOTOS) & set(shapes.TEST_PHOTOS)
    assert all((shapes.PHOTO_DIR / f"{name}.jpg").exists() for name in shapes.TEST_PHOTOS)
    rng_train, rng_test = shapes.split_rng("train", 0, 5), shapes.split_rng("test", 0, 5)
    assert rng_train.random() != rng_test.random()
    assert {s.photo for s in shapes.make_scenes("test", 40)} <= set(shapes.TEST_PHOTOS)


def test_answers_follow_from_the_scene():
    """Every answer recomputed from the scene's shapes, independently of how it was generated."""
    items = shapes.eval_items(40, seed=1)
    assert {i.qtype for i in items} == set(shapes.QTYPES)
    for item in items:
        found = item.scene.shapes
        words = item.question.rstrip("?").split()
        kinds = [s.kind for s in found]
        assert len({s.color for s in found}) == len(found) and 3 <= len(found) <= 5
        if item.qtype == "color":
            (only,) = [s for s in found if s.kind == words[-1]]
            assert item.answer == only.color
        elif item.qtype == "shape":
            assert item.answer == next(s.kind for s in found if s.color == words[-2])
        elif item.qtype == "presence":
            present = any(s.color == words[-2] and s.kind == words[-1] for s in found)
            assert item.answer == ("yes" if present else "no")
        elif item.qtype == "count":
            assert item.answer == str(kinds.count(words[2][:-1]))
        else:
            (named,) = [s for s in found if s.kind == words[-1]]
            side = [s for s in found if (s.center_x < named.center_x) == (words[-4] == "left") and s != named]
            assert len(side) == 1 and item.answer == side[0].color
            assert all(abs(s.center_x - named.center_x) >= shapes.PATCH_SIZE for s in found if s != named)


def test_objects_are_small_and_apart():
    for scene in shapes.make_scenes("test", 20, seed=2):
        sizes = shapes.shape_sizes(scene)
        assert all(1.0 <= s <= 19.0 for s in sizes), sizes  # a few patches of the 576
        cover = shapes.patch_coverage(scene)
        assert (cover.sum(0) <= 1.0 + 1e-9).all()  # no two shapes share a pixel
        assert np.asarray(shapes.render(scene, "background")).std() > 0


def test_size_bins():
    assert shapes.size_bins() == ["0-3", "3-6", "6-10", ">=10"]
    assert [shapes.size_bin(s) for s in (0.5, 3.0, 9.99, 40.0, None)] == ["0-3", "3-6", "6-10", ">=10", None]
    items = shapes.eval_items(3)
    summary = accuracy_summary(items, [True] * len(items))
    assert sum(m["n"] for m in summary["by_size"].values()) == sum(i.size is not None for i in items)
    assert set(summary["by_type"]) == {i.qtype for i in items} and summary["accuracy"] == 1.0


# ---------------------------------------------------------------------- training script
def test_packed_questions_equal_separate_sequences():
    """Stage b's packed sequence (prefix once, 4-D mask, explicit positions) gives every question
    the logits of its own full sequence."""
    script = _load_script()
    model, processor = build_testbed2(0, TINY2_SIZE)
    model.eval()
    packer = script.Packer(processor)
    scenes = shapes.make_scenes("test", 2, seed=5)
    per_image = [shapes.scene_questions(s, shapes.split_rng("test", 9, i), 1) for i, s in enumerate(scenes)]
    pixels = script.pixels_of(processor, [shapes.render(s) for s in scenes])
    ids, mask, positions, target, _, question = packer.pack(per_image)
    with torch.no_grad():
        packed = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions).logits
        for b, items in enumerate(per_image):
            for q, item in enumerate(items):
                alone = torch.tensor([packer.prefix + packer.suffix(item)])
                logits = model(input_ids=alone, pixel_values=pixels[b : b + 1]).logits[0, -3:-1]
                where = (question[b] == q).nonzero()[:, 0]
                torch.testing.assert_close(packed[b, where], logits, atol=1e-5, rtol=1e-5)
                assert target[b, where].tolist() == alone[0, -2:].tolist()


def test_scaffold_rebuilds_the_attention_and_finds_the_words():
    """Stage b's training scaffold: the attention it supervises, rebuilt from q and k, is what the
    model computes (eager weights as reference), and its anchors are the question's words."""
    script = _load_script()
    model, processor = build_testbed2(0, TINY2_SIZE, attn_implementation="eager")
    model.eval()
    packer = script.Packer(processor)
    scenes = shapes.make_scenes("test", 2, seed=5)
    per_image = [shapes.scene_questions(s, shapes.split_rng("test", 9, i), 2) for i, s in enumerate(scenes)]
    pixels = script.pixels_of(processor, [shapes.render(s) for s in scenes])
    ids, mask, positions, *_ = packer.pack(per_image)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager's form
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=additive,
            position_ids=positions,
            output_hidden_states=True,
            output_attentions=True,
        )
        for layer in range(model.config.text_config.num_hidden_layers):
            q, k, scale = script.rebuilt_qk(model, out.hidden_states, layer, positions)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            weights = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
            torch.testing.assert_close(weights, out.attentions[layer], atol=1e-5, rtol=1e-5)
    args = script.parse_args(["--out", "unused"])
    anchors = script.Scaffold(model, processor, args).anchors(packer, per_image)
    assert len(anchors) == sum(map(len, per_image))
    words = processor.tokenizer.convert_ids_to_tokens
    for b, q, look, probe, answer_at, answer_id in anchors:
        item = per_image[b][q]
        assert [words(int(ids[b, i])) for i in (look, probe)] == list(script.key_words(item))
        assert words(int(ids[b, answer_at + 1])) == item.answer == words(answer_id)
        assert words(int(ids[b, look])) in item.question.rstrip("?").split()


def test_training_script_runs_and_resumes_exactly(tmp_path: Path):
    script = _load_script()
    common = ["--tiny", "--photo-dir", str(shapes.PHOTO_DIR), "--vision-steps", "2", "--vision-batch", "2"]
    common += ["--lm-steps", "2", "--lm-images", "2", "--warmup", "1", "--per-type", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    report = script.main([*common, "--out", str(straight), "--eval-scenes", "2"])
    assert report["metrics"]["unpruned"]["n"] > 0 and (straight / "MODEL_CARD.md").exists()
    assert script.main([*common, "--out", str(split), "--no-eval", "--stop-after", "3"]) == {"stopped": True}
    script.main([*common, "--out", str(split), "--no-eval", "--resume"])
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = LlavaForConditionalGeneration.from_pretrained(split)
    processor = AutoProcessor.from_pretrained(split)
    inputs = processor(
        images=[shapes.render(shapes.make_scenes("test", 1)[0])],
        text=[build_prompt(processor, "what shape is the red object?")],
        return_tensors="pt",
    )
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 1


def test_training_continues_from_a_saved_model(tmp_path: Path):
    """--init-from starts stage 2 from a saved folder's weights (no vision stage), says so in the
    card, and refuses a folder of another architecture in one line."""
    script = _load_script()
    common = ["--tiny", "--photo-dir", str(shapes.PHOTO_DIR), "--vision-steps", "2", "--vision-batch", "2"]
    common += ["--lm-steps", "1", "--lm-images", "2", "--warmup", "1", "--per-type", "1", "--no-eval"]
    common += ["--tower-lr-scale", "0"]
    first, second = tmp_path / "first", tmp_path / "second"
    script.main([*common, "--out", str(first)])
    script.main([*common, "--out", str(second), "--init-from", str(first)])
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    tower = [k for k in a if "vision_tower" in k]
    assert tower and all(torch.equal(a[k], b[k]) for k in tower)  # frozen tower, no stage 1 re-run
    assert any(not torch.equal(a[k], b[k]) for k in a if k not in tower)  # stage 2 moved on
    assert f"started from the weights of `{first}`" in (second / "MODEL_CARD.md").read_text()
    with pytest.raises(SystemExit, match="not the architecture"):
        script.main([*common[1:], "--out", str(tmp_path / "third"), "--init-from", str(first)])


def test_refine_vision_runs_the_vision_stage_on_loaded_weights(tmp_path: Path):
    """--init-from with --refine-vision N: N vision-stage steps (with the scene heads and the object
    mass head, as the shipped recipe) on the loaded tower, then stage 2 with the mass count look-up;
    the card says all of it."""
    script = _load_script()
    common = ["--tiny", "--photo-dir", str(shapes.PHOTO_DIR), "--vision-steps", "2", "--vision-batch", "2"]
    common += ["--lm-steps", "1", "--lm-images", "2", "--warmup", "1", "--per-type", "1", "--no-eval"]
    common += ["--tower-lr-scale", "0"]
    first, second = tmp_path / "first", tmp_path / "second"
    script.main([*common, "--out", str(first)])
    refine = ["--init-from", str(first), "--refine-vision", "3", "--scene-heads", "1"]
    refine += ["--mass-weight", "1", "--count-look", "mass"]
    script.main([*common, "--out", str(second), *refine])
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    tower = [k for k in a if "vision_tower" in k]
    assert any(not torch.equal(a[k], b[k]) for k in tower)  # the tower trained again
    card = (second / "MODEL_CARD.md").read_text()
    assert "stage 1 ran 3 more steps on the loaded tower" in card and "side rank" in card
    assert "Vision tower alone (3 steps" in card
    assert "the log of the patch's object mass" in card and "its share is 1/(n+1)" in card


def test_word_probe_keeps_the_look_up_word_and_is_off_by_default(tmp_path: Path):
    """--word-weight W: a training-only head on the look-up layer's input at the look-up word
    predicts that word (its target is the word itself); without it the scaffold has no such head,
    so older checkpoints still load; the card says when it ran."""
    script = _load_script()
    model, processor = build_testbed2(0, TINY2_SIZE)
    packer = script.Packer(processor)
    batch_args = script.parse_args(
        ["--out", "unused", "--photo-dir", str(shapes.PHOTO_DIR), "--lm-images", "2"]
    )
    pixels, packed, per_image, evidence = script.lm_batch(processor, packer, 0, batch_args)
    ids, mask, positions, *_ = packed
    off = script.Scaffold(model, processor, script.parse_args(["--out", "unused"]))
    assert not hasattr(off, "word") and not any(k.startswith("word") for k in off.state_dict())
    args = script.parse_args(["--out", "unused", "--word-weight", "1", "--look-layer", "1"])
    on = script.Scaffold(model, processor, args)
    anchors = on.anchors(packer, per_image)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values=pixels,
            attention_mask=mask,
            position_ids=positions,
            output_hidden_states=True,
        )
    losses = on.losses(model, out.hidden_states, packed, anchors, evidence, packer.image_id)
    rows = torch.tensor([a[0] for a in anchors])
    looked = torch.tensor([a[2] for a in anchors])
    words = processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids[rows, looked]])
    assert words == [script.key_words(per_image[b][q])[0] for b, q, *_ in anchors]
    logits = on.word(on.word_norm(out.hidden_states[1][rows, looked]))
    expected = torch.nn.functional.cross_entropy(logits, ids[rows, looked])
    torch.testing.assert_close(losses["word"], expected)
    common = ["--tiny", "--photo-dir", str(shapes.PHOTO_DIR), "--vision-steps", "1", "--vision-batch", "2"]
    common += ["--lm-steps", "1", "--lm-images", "2", "--warmup", "1", "--per-type", "1", "--no-eval"]
    script.main([*common, "--out", str(tmp_path / "run"), "--word-weight", "0.5"])
    assert "predicts that word (weight 0.5" in (tmp_path / "run" / "MODEL_CARD.md").read_text()


def test_scene_targets_rank_sides_and_count_kinds():
    """The stage-a scene facts on each shape's patches: side rank by box centre (0 leftmost,
    1 rightmost, 2 between) and the number of same-kind shapes less one; IGNORE elsewhere."""
    script = _load_script()
    grid = shapes.IMAGE_SIZE // shapes.PATCH_SIZE
    for scene in shapes.make_scenes("train", 6, 0, photo_dir=str(shapes.PHOTO_DIR)):
        colour, kind, centre, side, many, mass = script.patch_targets(scene, grid)
        on = colour > 0
        assert ((side == script.IGNORE) == ~on).all() and ((many == script.IGNORE) == ~on).all()
        xs = [s.center_x for s in scene.shapes]
        for i, s in enumerate(scene.shapes):
            at = script.centre_patches(scene, grid)[i]
            want = 0 if xs[i] == min(xs) else 1 if xs[i] == max(xs) else 2
            assert side[at] == want
            assert many[at] == sum(t.kind == s.kind for t in scene.shapes) - 1
        # the mass target: per kind, summed over the patches, the number of shapes of that kind
        assert mass.shape == (grid * grid, len(shapes.KINDS))
        read = (mass.exp() - script.MASS_FLOOR).sum(0)
        want = torch.tensor([float(sum(s.kind == k for s in scene.shapes)) for k in shapes.KINDS])
        torch.testing.assert_close(read, want, atol=1e-4, rtol=0)
        untouched = torch.from_numpy(shapes.patch_coverage(scene).sum(0).reshape(-1) == 0)
        assert untouched.any() and (mass[untouched] == float(np.log(script.MASS_FLOOR))).all()


@pytest.mark.parametrize("look", ["centre", "kind", "mass"])
def test_count_evidence_follows_the_count_look(look):
    """--count-look centre: one centre patch per counted object plus the sink, equal shares (the
    sink's share says the count); kind: all the counted objects' patches, the sink only for none;
    mass: all the counted objects' patches, each object adding up to the sink's share.
    Other question types are the same either way: their objects' patches, no sink."""
    script = _load_script()
    grid = shapes.IMAGE_SIZE // shapes.PATCH_SIZE
    scenes = shapes.make_scenes("train", 6, 0, photo_dir=str(shapes.PHOTO_DIR))
    per_image = [
        shapes.scene_questions(s, shapes.split_rng("train", 7919, i), 2) for i, s in enumerate(scenes)
    ]
    evidence = script.question_evidence(scenes, per_image, grid, look)
    found = {(b, q): (where, sink) for b, q, where, sink in evidence}
    counts = 0
    for b, (scene, items) in enumerate(zip(scenes, per_image)):
        cover = torch.from_numpy(shapes.patch_coverage(scene)).flatten(1).float()
        for q, item in enumerate(items):
            if item.qtype != "count" and not item.objects:
                assert (b, q) not in found
                continue
            where, sink = found[(b, q)]
            assert abs(float(where.sum()) + sink - 1) < 1e-5
            n = len(item.objects)
            if item.qtype != "count" or look == "kind":
                if n:
                    covered = sum(cover[i] for i in item.objects)
                    assert sink == 0 and torch.allclose(where, covered / covered.sum())
                else:
                    assert sink == 1 and where.sum() == 0
            elif look == "mass":
                counts += 1
                assert sink == pytest.approx(1 / (n + 1))
                for i in item.objects:  # each object's patches, which no other shape shares
                    alone = (cover[i] > 0) & (cover.sum(0) == cover[i])
                    torch.testing.assert_close(where[alone], cover[i][alone] / cover[i].sum() / (n + 1))
                assert float(where.sum()) == pytest.approx(n / (n + 1))
            else:
                counts += 1
                assert sink == pytest.approx(1 / (n + 1))
                assert (where > 0).sum() == n
                assert torch.allclose(where[where > 0], torch.full((n,), 1 / (n + 1)))
    assert counts or look == "kind"


# ---------------------------------------------------------------------- the shipped model
@needs_model
def test_shipped_testbed2_is_a_stock_llava_at_llava_geometry():
    config = LlavaForConditionalGeneration.config_class.from_pretrained(TESTBED2_DIR)
    vision, text = config.vision_config, config.text_config
    assert vision.model_type == "clip_vision_model" and text.model_type == "llama"
    assert (vision.image_size // vision.patch_size) ** 2 == 576 and config.image_seq_length == 576
    assert text.num_hidden_layers >= 16
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert (TESTBED2_DIR / "model.safetensors").stat().st_size <= 40 * 2**20
    processor = AutoProcessor.from_pretrained(TESTBED2_DIR)
    prompt = build_prompt(processor, "what color is the circle?")
    assert prompt == "USER: <image>\nwhat color is the circle? ASSISTANT:"


@needs_model
def test_shipped_testbed2_is_accurate_and_fast():
    start = time.perf_counter()
    model, processor = load_testbed2()
    items = fixed_subset(shapes.eval_items(300), 300, seed=0)
    texts = answer(model, processor, item_batches(items, 50)).texts
    result = accuracy_summary(items, score(items, texts))
    elapsed = time.perf_counter() - start
    assert result["n"] == 300
    # Issue 15's bar. The shipped model (attempt 15) scores 94.0% on this subset (95.8% on 2,713
    # further test questions; docs/results/testbed2-attempt15): three answers of margin for CPU numerics.
    assert result["accuracy"] >= 0.93, result
    assert elapsed < 90, f"load + 300 questions took {elapsed:.1f}s"


def test_eval_on_shapes_reports_types_sizes_and_ablation(capsys, tmp_path):
    """`vistrim eval --data shapes` (the plumbing, on the random tiny model): per-type and by-size
    accuracy in the JSON, the size table and plot; --ablate records what replaced the images."""
    out = tmp_path / "eval"
    argv = ["eval", "--model", "tiny", "--data", "shapes", "--methods", "random", "--budgets", "16"]
    code, stdout, err = run_cli(capsys, *argv, "--limit", "12", "--batch-size", "6", "--out", str(out))
    assert code == 0, err
    document = json.loads((out / "eval.json").read_text())
    rows = document["rows"]
    assert document["settings"]["data"].startswith("shapes test split") and rows[0]["n"] == 12
    assert set(rows[0]["by_type"]) <= set(shapes.QTYPES) and set(rows[0]["by_size"]) <= set(
        shapes.size_bins()
    )
    assert sum(m["n"] for m in rows[0]["by_size"].values()) <= 12
    assert (out / "accuracy_by_size.png").stat().st_size > 1000 and "object size" in stdout
    code, _, err = run_cli(capsys, *argv, "--limit", "6", "--ablate", "background", "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["settings"]["data"].endswith("(background)")


def test_missing_testbed2_is_a_one_line_error(monkeypatch, tmp_path):
    import vistrim.models.testbed2 as testbed2
    from vistrim.errors import VistrimError
    from vistrim.models import load_model

    monkeypatch.setattr(testbed2, "TESTBED2_DIR", tmp_path)
    with pytest.raises(VistrimError, match="cannot load the shipped test-bed 2 model"):
        load_model("testbed2")


@needs_model
def test_testbed2_eval_cli_reports_types_sizes_and_ablation(capsys, tmp_path):
    """`vistrim eval --model testbed2`: per-type and by-size accuracy, plots; the background-only
    image falls towards the answer prior."""
    out = tmp_path / "eval"
    argv = ["eval", "--model", "testbed2", "--methods", "random", "--budgets", "64", "--limit", "60"]
    code, stdout, err = run_cli(capsys, *argv, "--batch-size", "30", "--out", str(out))
    assert code == 0, err
    document = json.loads((out / "eval.json").read_text())
    rows = document["rows"]
    assert document["settings"]["data"].startswith("shapes test split")
    assert set(rows[0]["by_type"]) == set(shapes.QTYPES) and set(rows[0]["by_size"]) <= set(
        shapes.size_bins()
    )
    assert rows[1]["layer_average_visual"] == pytest.approx(64, abs=1)
    assert (out / "accuracy_by_size.png").stat().st_size > 1000 and "object size" in stdout
    code, _, err = run_cli(capsys, *argv, "--methods", "none", "--ablate", "background", "--out", str(out))
    assert code == 0, err
    background = json.loads((out / "eval.json").read_text())["rows"][0]
    assert background["accuracy"] <= rows[0]["accuracy"] - 0.3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny", "--ablate", "background"], "--ablate background needs --data shapes"),
        (["--model", "tiny", "--fidelity", "--images", "x", "--ablate", "blank"], "belong to labelled mode"),
    ],
)
def test_eval_ablation_bad_input_is_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, "eval", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_count_answers_are_scored():
    """Number answers are compared as numbers (a letters-only rule once matched every count guess)."""
    item = next(i for i in shapes.eval_items(5) if i.qtype == "count")
    wrong = str((int(item.answer) + 1) % 4)
    assert score([item, item, item], [item.answer, wrong, ""]) == [True, False, False]
