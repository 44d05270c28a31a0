"""``vistrim eval``: accuracy arithmetic on injected answers, reached budgets from the runtime,
fidelity on the tiny model, one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import no_hooks, run_cli
from PIL import Image

import vistrim.data.easyvqa as easyvqa
import vistrim.evaluate.harness as harness
from vistrim.data.easyvqa import VQAItem
from vistrim.evaluate.fidelity import first_token_kl, identical_share, pair_up
from vistrim.evaluate.harness import config_summary
from vistrim.evaluate.report import budget_target, missed_budgets


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def labelled_items(image: str) -> list[VQAItem]:
    return [
        VQAItem("what shape is in the image ?", "circle", image, "shape"),
        VQAItem("what shape is this ?", "circle", image, "shape"),
        VQAItem("what color is the shape ?", "red", image, "color"),
        VQAItem("is there a red shape ?", "yes", image, "yesno"),
    ]


# ---------------------------------------------------------------------- pure arithmetic
def test_config_summary_by_hand():
    items = labelled_items("x.png")
    summary = config_summary(
        items, ["Circle.", "triangle", "red", "no"], [10, 20, 30, 40], reference_accuracy=0.75
    )
    assert summary["accuracy"] == 0.5 and summary["n"] == 4
    assert summary["relative_accuracy"] == pytest.approx(0.5 / 0.75)
    assert summary["by_type"] == {
        "shape": {"accuracy": 0.5, "n": 2},
        "color": {"accuracy": 1.0, "n": 1},
        "yesno": {"accuracy": 0.0, "n": 1},
    }
    assert summary["layer_average_visual"] == 25.0
    assert config_summary(items, ["x"] * 4, [1] * 4, reference_accuracy=0.0)["relative_accuracy"] is None


def test_first_token_kl_and_identical_share_by_hand():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]]).log()
    q = torch.tensor([[0.25, 0.75], [0.2, 0.8]]).log()
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert first_token_kl(p, q).tolist() == pytest.approx([expected, 0.0], abs=1e-7)
    assert identical_share(["a b", "c", "d"], ["a b", "c ", "d"]) == pytest.approx(2 / 3)
    assert pair_up(["i1", "i2"], ["p1", "p2"], limit=3) == [("i1", "p1"), ("i1", "p2"), ("i2", "p1")]


def test_instruction_goes_after_each_question(image_dir):
    items = labelled_items(str(image_dir / "a.png"))
    batches = harness.item_batches(items, 3, "Answer briefly.")
    assert [len(questions) for _, questions in batches] == [3, 1]
    assert batches[1][1] == ["is there a red shape ?\nAnswer briefly."]
    assert harness.item_batches(items, 4)[0][1][0] == "what shape is in the image ?"
    assert harness.default_instruction("testbed") == "" and harness.default_instruction("org/llava") != ""


# ---------------------------------------------------------------------- a run with injected answers
def test_eval_relative_accuracy_and_reached_budgets(capsys, tmp_path, image_dir, monkeypatch):
    items = labelled_items(str(image_dir / "a.png"))
    monkeypatch.setattr(easyvqa, "load_split", lambda split: items)
    seen = {"items": 0}
    real_generate = harness.generate_batch

    def injected(model, inputs, max_new_tokens):
        """A real prefill (so the runtime records what it reached), then fixed answers: the
        unpruned model answers every item right, a trimmed one says "circle" to everything."""
        real_generate(model, inputs, 1)
        rows = inputs["input_ids"].shape[0]
        order = [(seen["items"] + i) % len(items) for i in range(rows)]
        seen["items"] += rows
        words = [items[i].answer if no_hooks(model) else "circle" for i in order]
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = [torch.tensor([tokenizer.convert_tokens_to_ids(w)]) for w in words]
        return ids, torch.zeros(rows, vocab)

    from vistrim.models.tiny import build_processor

    tokenizer = build_processor(32, 4).tokenizer
    monkeypatch.setattr(harness, "generate_batch", injected)
    out = tmp_path / "eval"
    argv = ["eval", "--model", "tiny", "--methods", "fastv", "--budgets", "32,0.75,8", "--batch-size", "3"]
    code, stdout, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 0, err
    document = json.loads((out / "eval.json").read_text())
    rows = document["rows"]
    assert [(r["label"], r["budgets"]) for r in rows] == [
        ("unpruned", []),
        ("fastv", [32]),
        ("fastv", [0.75]),
        ("fastv", [8]),
    ]
    assert rows[0]["accuracy"] == 1.0 and rows[0]["layer_average_visual"] == 64
    for row in rows[1:]:  # circle, circle right; red, yes wrong
        assert row["accuracy"] == 0.5 and row["relative_accuracy"] == 0.5
        assert row["by_type"]["shape"]["accuracy"] == 1.0 and row["by_type"]["yesno"]["accuracy"] == 0.0
    # 64 visual tokens, 6 layers, FastV cuts after layer 2: (64*2 + 16*4) / 6 and (64*2 + 40*4) / 6
    assert rows[1]["layer_average_visual"] == 32.0 and rows[1]["settings"]["keep"] == 16
    assert rows[2]["layer_average_visual"] == 48.0 and rows[2]["settings"]["keep"] == 40
    # 8 is below one layer of 64 tokens over 6 layers: the lowest a cut after layer 1 reaches, said
    assert rows[3]["layer_average_visual"] == pytest.approx(64 / 6) and rows[3]["settings"]["layer"] == 1
    assert document["budget_misses"] == [
        "fastv at 8: reached 10.7 layer-averaged visual tokens, not 8.0: it cannot go lower here with these "
        "settings (layers before its first cut see every token; protected tokens stay): compare it at the "
        "tokens it reached"
    ]
    assert "budget not reached: fastv at 8: reached 10.7" in " ".join(stdout.split())
    assert len(rows[1]["batch_stats"]) == 2  # batches of 3 and 1, both counted
    assert "relative" in stdout and (out / "accuracy_vs_budget.png").stat().st_size > 1000


def test_fidelity_none_matches_unpruned_exactly(capsys, tmp_path, image_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what color is the shape ?\n\nis there a red circle in the top left of the photo ?\n")
    out = tmp_path / "fid"
    argv = ["eval", "--fidelity", "--model", "tiny", "--images", str(image_dir), "--prompts", str(prompts)]
    argv += ["--methods", "none,fastv", "--budgets", "0.5", "--batch-size", "3", "--max-new-tokens", "4"]
    code, stdout, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 0, err
    document = json.loads((out / "eval.json").read_text())
    rows = {r["label"]: r for r in document["rows"]}
    assert document["settings"]["samples"] == 4  # 2 images x 2 prompts (blank line and .txt skipped)
    assert rows["none"]["identical"] == 1.0 and rows["none"]["kl_first_token"] < 1e-9
    assert rows["none"]["answers"] == rows["unpruned"]["answers"]
    # budget 0.5 = 32 layer-averaged tokens of 64: FastV keeps 16 after layer 2, (64*2 + 16*4) / 6
    assert rows["fastv"]["layer_average_visual"] == 32.0 and rows["fastv"]["settings"]["keep"] == 16
    assert rows["fastv"]["kl_first_token"] >= 0 and 0 <= rows["fastv"]["identical"] <= 1
    assert (out / "fidelity_vs_budget.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fidelity", "--images", "/no/such/folder", "--prompt", "what ?"], "image or folder not found"),
        (["--fidelity", "--prompt", "what ?"], "--fidelity needs --images"),
        (["--images", "x.png"], "belong to --fidelity"),
        (["--methods", "fastv,nosuch"], "unknown method 'nosuch'"),
        (["--budgets", "0.3,lots"], "bad budget 'lots'"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_eval_bad_input_is_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_fidelity_empty_folder_and_missing_prompts(capsys, tmp_path, image_dir):
    code, _, err = run_cli(
        capsys, "eval", "--fidelity", "--model", "tiny", "--images", str(tmp_path), "--prompt", "x"
    )
    assert code == 2 and "no images" in err
    code, _, err = run_cli(capsys, "eval", "--fidelity", "--model", "tiny", "--images", str(image_dir))
    assert code == 2 and "no prompt" in err


def test_eval_takes_config_and_set_like_run(capsys, tmp_path, image_dir):
    """defaults < --config [method] table < --set (KEY for every method with it, METHOD.KEY for one);
    --batch / --samples / --new-tokens are the same options as --batch-size / --limit / --max-new-tokens."""
    config = tmp_path / "methods.toml"
    config.write_text("[fastv]\nlayer = 3\nkeep = 0.5\n[random]\nseed = 1\n")
    out = tmp_path / "eval"
    argv = ["eval", "--fidelity", "--model", "tiny", "--images", str(image_dir), "--prompt", "what ?"]
    argv += ["--methods", "fastv,random", "--budgets", "default", "--config", str(config)]
    argv += [
        "--set",
        "keep=8",
        "--set",
        "random.seed=3",
        "--batch",
        "2",
        "--samples",
        "2",
        "--new-tokens",
        "2",
    ]
    code, _, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 0, err
    document = json.loads((out / "eval.json").read_text())
    fastv, random = document["rows"][1:]
    assert fastv["settings"] == {"layer": 3, "keep": 8, "rounding": "ceil"}
    assert random["settings"] == {"layer": 2, "keep": 8, "seed": 3}
    assert document["settings"]["batch_size"] == 2 and document["settings"]["max_new_tokens"] == 2
    assert document["settings"]["samples"] == 2
    # 64 visual tokens over 6 layers, 8 kept from layer 3: processed (3*64 + 3*8) / 6 = 36,
    # post-cut (2*64 + 4*8) / 6, as released code logs it
    assert fastv["layer_average_visual"] == 36.0
    assert fastv["layer_average_visual_post_cut"] == pytest.approx(160 / 6)


def test_budget_targets_and_misses_by_hand():
    """Ratios scale each sample's visual tokens, counts are capped by them, post-cut budgets are
    checked against the post-cut count; rows within a token of their budget pass."""
    assert budget_target(0.5, [100.0, 50.0]) == (37.5, "processed")
    assert budget_target(64, [100.0, 50.0]) == (57.0, "processed")
    assert budget_target("64:post_cut", [576.0]) == (64.0, "post_cut")
    assert budget_target("default", [576.0]) is None
    unpruned = {
        "label": "unpruned",
        "budgets": [],
        "layer_average_visual": 576.0,
        "reached_per_sample": [576.0],
    }
    near = {"label": "a", "budgets": [64], "layer_average_visual": 64.9}
    far = {
        "label": "b",
        "budgets": ["64:post_cut"],
        "layer_average_visual": 90.0,
        "layer_average_visual_post_cut": 70.0,
    }
    fine = {
        "label": "c",
        "budgets": ["64:post_cut"],
        "layer_average_visual": 90.0,
        "layer_average_visual_post_cut": 64.5,
    }
    misses = missed_budgets([unpruned, near, far, fine])
    assert len(misses) == 1 and misses[0].startswith(
        "b at 64:post_cut: reached 70.0 layer-averaged visual tokens, not 64.0"
    )
