"""The ``vistrim`` command line: list, run, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from vistrim.models.tiny import build_tiny


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_tiny(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8")).save(path)
    return path


def test_list_shows_methods_and_defaults(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for text in ("fastv", "pdrop", "random", "none", "keep", "0.5", "stages"):
        assert text in out


def test_list_states_supported_families_and_tested_releases(capsys):
    from vistrim.compat import TESTED
    from vistrim.families import FAMILIES, REFUSED

    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "model families" in out
    flat = " ".join(out.split())  # the terminal wraps long lines
    for family in FAMILIES.values():
        assert f"- {family.name}: " in flat and all(c in flat for c in family.model_classes)
    assert f"tested with transformers {', '.join(TESTED)}" in flat
    assert all(f"refused: {name}" in flat for name in REFUSED)


def test_run_prints_answer_counts_and_kv(capsys, saved_tiny, picture, tmp_path):
    report = tmp_path / "run.json"
    code, out, err = run_cli(
        capsys,
        "run",
        "--model",
        str(saved_tiny),
        "--image",
        str(picture),
        "--prompt",
        "What color is it?",
        "--method",
        "fastv",
        "--set",
        "keep=0.25",
        "--max-new-tokens",
        "4",
        "--json",
        str(report),
    )
    assert code == 0, err
    assert "answer:" in out and "64 64 16 16 16 16" in out and "KV cache after prefill" in out
    data = json.loads(report.read_text())
    assert data["settings"] == {"layer": 2, "keep": 0.25, "rounding": "ceil"}
    assert [entry["name"] for entry in data["settings_schema"]] == ["layer", "keep", "rounding"]
    assert data["prefill_visual_per_layer"] == [64, 64, 16, 16, 16, 16]
    assert data["kv_bytes_after_prefill"] < data["kv_bytes_after_prefill_unpruned"]


def test_config_file_then_command_line_override(capsys, saved_tiny, picture, tmp_path):
    config = tmp_path / "methods.toml"
    config.write_text("[fastv]\nlayer = 3\nkeep = 0.5\n")
    code, out, err = run_cli(
        capsys,
        "run",
        "--model",
        str(saved_tiny),
        "--image",
        str(picture),
        "--prompt",
        "what ?",
        "--method",
        "fastv",
        "--config",
        str(config),
        "--set",
        "keep=8",
        "--max-new-tokens",
        "1",
    )
    assert code == 0, err
    assert "fastv(layer=3, keep=8, rounding='ceil')" in out and "64 64 64 8 8 8" in out


def _odd_images(folder):
    rng = np.random.default_rng(1)
    paths = {}
    paths["gray"] = folder / "gray.png"
    Image.fromarray((rng.random((30, 30)) * 255).astype("uint8"), "L").save(paths["gray"])
    paths["rgba"] = folder / "rgba.png"
    Image.fromarray((rng.random((30, 20, 4)) * 255).astype("uint8"), "RGBA").save(paths["rgba"])
    paths["16bit"] = folder / "deep.png"
    Image.fromarray((rng.random((25, 25)) * 65535).astype("uint16")).save(paths["16bit"])
    paths["palette"] = folder / "palette.gif"
    Image.fromarray((rng.random((20, 40, 3)) * 255).astype("uint8")).convert("P").save(paths["palette"])
    paths["jpeg"] = folder / "photo.jpg"
    Image.fromarray((rng.random((300, 200, 3)) * 255).astype("uint8")).save(paths["jpeg"])
    return paths


def test_odd_but_valid_images_work(capsys, saved_tiny, tmp_path):
    for kind, path in _odd_images(tmp_path).items():
        code, _, err = run_cli(
            capsys,
            "run",
            "--model",
            str(saved_tiny),
            "--image",
            str(path),
            "--prompt",
            "what ?",
            "--max-new-tokens",
            "1",
        )
        assert code == 0, (kind, err)


def _bad_inputs(tmp, saved_tiny, picture):
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    empty = tmp / "empty.jpg"
    empty.write_bytes(b"")
    dot = tmp / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    text_model = tmp / "text-only"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=10
        )
    ).save_pretrained(text_model)
    bad_config = tmp / "bad.toml"
    bad_config.write_text("[fastv\nkeep=")
    base = ["run", "--model", str(saved_tiny), "--image", str(picture), "--prompt", "what ?"]
    return {
        "image not found": [
            "run",
            "--model",
            str(saved_tiny),
            "--image",
            str(tmp / "nope.png"),
            "--prompt",
            "q",
        ],
        "cannot read image": ["run", "--model", str(saved_tiny), "--image", str(corrupt), "--prompt", "q"],
        "cannot read image ": ["run", "--model", str(saved_tiny), "--image", str(empty), "--prompt", "q"],
        "too small": ["run", "--model", str(saved_tiny), "--image", str(dot), "--prompt", "q"],
        "image path is a folder": ["run", "--model", str(saved_tiny), "--image", str(tmp), "--prompt", "q"],
        "required: --image": ["run", "--model", str(saved_tiny), "--prompt", "what is in it?"],
        "2 <image> placeholders": [*base[:-1], "<image> <image> what ?"],
        "prompt is empty": [*base[:-1], "  "],
        "out of range": [*base, "--method", "fastv", "--set", "keep=1.5"],
        "unknown method": [*base, "--method", "fastvv"],
        "no setting 'keeep'": [*base, "--method", "fastv", "--set", "keeep=3"],
        "KEY=VALUE": [*base, "--method", "fastv", "--set", "keep"],
        "6 decoder layers": [*base, "--method", "fastv", "--set", "layer=9"],
        "has no image token": ["run", "--model", str(text_model), "--image", str(picture), "--prompt", "q"],
        "model folder not found": [
            "run",
            "--model",
            str(tmp / "missing-model"),
            "--image",
            str(picture),
            "--prompt",
            "q",
        ],
        "hub is unreachable": [
            "run",
            "--model",
            "someone/no-such-vlm",
            "--image",
            str(picture),
            "--prompt",
            "q",
        ],
        "config file not found": [*base, "--config", str(tmp / "none.toml")],
        "cannot read config": [*base, "--config", str(bad_config)],
        "unknown dtype": [*base, "--dtype", "float8"],
        "max-new-tokens": [*base, "--max-new-tokens", "0"],
        "invalid choice": ["frobnicate"],
    }


def test_bad_inputs_fail_with_one_line(capsys, saved_tiny, picture, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for expected, argv in _bad_inputs(tmp_path, saved_tiny, picture).items():
        code, _, err = run_cli(capsys, *argv)
        assert code != 0, expected
        assert err.count("\n") == 1 and err.startswith("vistrim: error:"), (expected, err)
        assert expected.strip() in err, (expected, err)


def test_console_script_has_no_traceback(tmp_path):
    """Through the installed entry point, an error is one line on stderr and a non-zero exit."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vistrim.cli.main",
            "run",
            "--model",
            "tiny",
            "--image",
            str(tmp_path / "x.png"),
            "--prompt",
            "q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith("vistrim: error: image not found")
        and "Traceback" not in result.stderr
    )


def test_run_mustdrop_and_st3_report_their_stages(capsys, saved_tiny, tmp_path):
    image = tmp_path / "flat.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    base = ["run", "--model", str(saved_tiny), "--image", str(image), "--prompt", "what color ?"]
    code, out, err = run_cli(
        capsys, *base, "--method", "mustdrop", "--set", "budget=16", "--max-new-tokens", "2"
    )
    assert code == 0, err
    assert "merged windows: [4]" in out and "vision tower tokens per layer" in out
    assert "layer-averaged visual tokens: 16.0" in out
    code, out, err = run_cli(
        capsys, *base, "--method", "st3", "--set", "horizon=2", "--set", "every=1", "--max-new-tokens", "4"
    )
    assert code == 0, err
    assert "64 52 33 17 9 6" in out and "in the cache after decoding: 0 0 0 0 0 0" in out


def test_the_same_option_has_the_same_name_on_every_command():
    from vistrim.cli.main import build_parser

    parser = build_parser()
    for command in (["bench"], ["eval"]):
        short = parser.parse_args([*command, "--batch", "3", "--samples", "4", "--new-tokens", "5"])
        long = parser.parse_args([*command, "--batch-size", "3", "--limit", "4", "--max-new-tokens", "5"])
        assert vars(short) == vars(long)
        # bench takes a list of batch sizes (--batch 1,8,32), eval one
        assert int(short.batch_size) == 3 and short.max_new_tokens == 5
    run = ["run", "--image", "x.png", "--prompt", "q"]
    assert parser.parse_args([*run, "--new-tokens", "7"]).max_new_tokens == 7
    for command in ("run", "bench", "eval"):
        options = parser.parse_args([command, *(run[1:] if command == "run" else []), "--set", "a=1"])
        assert options.settings == ["a=1"] and options.config is None


def test_model_help_names_every_named_model():
    from vistrim.cli.main import build_parser
    from vistrim.models import NAMED

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("run", "bench", "eval"):
        model = next(a for a in sub.choices[command]._actions if a.dest == "model")
        assert set(NAMED) <= {w.strip() for w in model.help.split("|")}, command
