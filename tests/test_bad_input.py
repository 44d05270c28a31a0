"""Bad and untrusted input (issue 11): one line on stderr, no "internal error", nothing run or
decoded that should not be, and checks done before the model loads."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from conftest import images, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file

import vistrim
import vistrim.io
from vistrim import VistrimError
from vistrim.models import load_model
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
    images(1)[0].save(path)
    return path


def one_line_error(code, err, expected: str) -> None:
    assert code != 0, (expected, err)
    assert err.count("\n") == 1 and err.startswith("vistrim: error:"), (expected, err)
    assert "internal error" not in err and expected in err, (expected, err)


def run_args(model, picture, *extra):
    return [
        "run",
        "--model",
        str(model),
        "--image",
        str(picture),
        "--prompt",
        "q",
        "--max-new-tokens",
        "1",
        *extra,
    ]


# ---------------------------------------------------------------- 1. untrusted model folders
EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def with_custom_code(saved_tiny, folder, marker, model_type: str):
    """A copy of the tiny model whose config and processor point at code in the folder that,
    if imported, leaves ``marker`` behind."""
    shutil.copytree(saved_tiny, folder)
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForImageTextToText": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "processor_config.json").read_text())
    processor["auto_map"] = {"AutoProcessor": "evil.Processor"}
    (folder / "processor_config.json").write_text(json.dumps(processor))
    return folder


def test_custom_code_is_never_run_even_when_the_user_says_yes(
    capsys, monkeypatch, saved_tiny, picture, tmp_path
):
    marker = tmp_path / "code-ran"
    folder = with_custom_code(saved_tiny, tmp_path / "custom", marker, model_type="llava-custom")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 5))  # transformers would ask "run it? [y/N]"
    code, out, err = run_cli(capsys, *run_args(folder, picture))
    one_line_error(code, err, "needs custom Python code")
    assert "never runs code" in err and out == "" and not marker.exists()


def test_known_architecture_with_auto_map_loads_builtin_classes_only(saved_tiny, tmp_path):
    marker = tmp_path / "code-ran"
    folder = with_custom_code(saved_tiny, tmp_path / "llava-with-code", marker, model_type="llava")
    model, processor = load_model(str(folder))
    assert type(model).__module__.startswith("transformers.models.llava")
    assert type(processor).__module__.startswith("transformers.models.llava")
    assert not marker.exists()


def test_broken_weights_and_incomplete_folders_are_one_short_line(capsys, saved_tiny, picture, tmp_path):
    truncated = shutil.copytree(saved_tiny, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:5000])
    garbage = shutil.copytree(saved_tiny, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"not safetensors at all")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(saved_tiny / "config.json", only_config)
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved_tiny / name, no_processor)
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = shutil.copytree(saved_tiny, tmp_path / "partial")
    tensors = load_file(partial / "model.safetensors")
    tensors.pop(sorted(name for name in tensors if "layers.0." in name)[0])
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    cases = {
        partial: "lacks 1 weight tensor(s)",
        truncated: "corrupt",
        garbage: "corrupt",
        only_config: "has no weights",
        no_processor: "the processor of",
        empty: "has no config.json",
        picture: "not a folder",
    }
    for folder, expected in cases.items():
        code, _, err = run_cli(capsys, *run_args(folder, picture))
        one_line_error(code, err, expected)
        assert len(err.replace(str(folder), "")) < 150, err  # short: no hub boilerplate


# ---------------------------------------------------------------- 2. images
def png_header(path, width: int, height: int):
    """A PNG that claims ``width`` x ``height`` pixels but holds a few rows of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (3 * width + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bombs_are_refused_from_the_header(capsys, saved_tiny, tmp_path):
    # 20000^2 trips PIL's own guard; 8193 x 8192 is just over vistrim's documented limit
    for width, height in ((20000, 20000), (8193, 8192)):
        path = png_header(tmp_path / f"bomb-{width}.png", width, height)
        code, _, err = run_cli(capsys, *run_args(saved_tiny, path))
        one_line_error(code, err, f"{vistrim.io.MAX_PIXELS:,}")


def test_pixel_limit_is_the_one_applied(monkeypatch, tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (41, 40)).save(path)
    assert vistrim.io.load_image(path).size == (41, 40)
    monkeypatch.setattr(vistrim.io, "MAX_PIXELS", 40 * 40)
    with pytest.raises(VistrimError, match="41x40: 1,640 pixels, more than vistrim's limit of 1,600"):
        vistrim.io.load_image(path)


def test_only_common_image_formats_are_decoded(tmp_path):
    portable = tmp_path / "looks-like.png"
    Image.new("RGB", (8, 8)).save(portable, format="PPM")
    with pytest.raises(VistrimError, match="not an image in a supported format"):
        vistrim.io.load_image(portable)


# ---------------------------------------------------------------- 4. budgets and geometry
def test_huge_counts_are_capped_at_the_visual_tokens(tiny, capsys, saved_tiny, picture, tmp_path):
    huge = 10**30
    assert vistrim.at_budget("fastv", huge, n_visual=64, num_layers=6).keep == 64
    report = tmp_path / "run.json"
    argv = run_args(saved_tiny, picture, "--method", "fastv", "--set", f"keep={huge}", "--json", str(report))
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert json.loads(report.read_text())["prefill_visual_per_layer"] == [64] * 6
    with pytest.raises(VistrimError, match="64-bit"):
        vistrim.build("random", seed=huge)  # not a count: no capping makes sense, so it is refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_visual": 64, "num_layers": 0}, "num_layers must be an integer >= 1"),
        ({"n_visual": -1, "num_layers": 6}, "n_visual must be an integer >= 0"),
        ({"n_visual": 64.0, "num_layers": 6}, "n_visual must be an integer"),
        ({"n_visual": 64, "num_layers": 6, "budget": "0.5"}, "must be a ratio (float) or a count"),
        ({"n_visual": 64, "num_layers": 6, "budget": True}, "must be a ratio (float) or a count"),
        ({"n_visual": 64, "num_layers": 6, "budget": float("nan")}, "out of range"),
    ],
)
@pytest.mark.parametrize("method", ["fastv", "pdrop", "st3", "mustdrop"])
def test_at_budget_refuses_impossible_geometry(method, kwargs, message):
    kwargs = {"budget": 0.5, **kwargs}
    with pytest.raises(VistrimError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vistrim.at_budget(method, kwargs.pop("budget"), **kwargs)


# ---------------------------------------------------------------- 6. devices and backends
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--device", "quantum0", "unknown device 'quantum0'"),
        ("--device", "meta", "holds no data"),
        ("--attn", "warp", "unknown attention backend 'warp' (choose eager, sdpa"),
        ("--attn", "kernels-community/flash-attn", "never runs code"),
    ],
)
def test_bad_device_or_backend_is_one_line(capsys, picture, option, value, message):
    code, _, err = run_cli(capsys, *run_args("tiny", picture, option, value))
    one_line_error(code, err, message)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_absent_cuda_device_is_one_line(capsys, picture):
    code, _, err = run_cli(capsys, *run_args("tiny", picture, "--device", "cuda:7"))
    one_line_error(code, err, "cuda:7")


# ---------------------------------------------------------------- 7. output paths
@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the output path was checked")

    monkeypatch.setattr("vistrim.models.load_model", refuse)


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create entries in (for root, which ignores permission bits,
    /proc: the kernel refuses new entries there to everyone)."""
    if os.geteuid() == 0:
        yield "/proc"
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    yield locked
    locked.chmod(0o700)


def test_output_paths_are_checked_before_any_work(capsys, no_model_load, unwritable, picture, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        (["--json", f"{a_file}/answer.json"], "is a file, not a folder"),
        (["--json", str(folder)], "is a folder"),
        (["--json", f"{unwritable}/answer.json"], "cannot write in"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(capsys, *run_args("tiny", picture, *extra))
        one_line_error(code, err, message)
    for command in ("bench", "eval"):
        for out, message in (
            (a_file, "is an existing file"),
            (a_file / "results", "is a file, not a folder"),
            (f"{unwritable}/results", "cannot write in"),
        ):
            code, _, err = run_cli(capsys, command, "--model", "tiny", "--out", str(out))
            one_line_error(code, err, message)
    assert a_file.read_text() == "keep me" and not list(folder.iterdir())


# ---------------------------------------------------------------- 8. text files
def test_prompts_file_must_be_utf8_text(capsys, no_model_load, picture, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("what colour is the caf\xe9?\n".encode("latin-1"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02")
    for path, message in ((latin1, "is not UTF-8 text (byte 0xe9 on line 1)"), (binary, "binary file")):
        argv = ["eval", "--model", "tiny", "--fidelity", "--images", str(picture), "--prompts", str(path)]
        code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
        one_line_error(code, err, message)


def test_utf8_text_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffwhat colour?\nwhich shape?\n".encode())
    assert vistrim.io.read_text(path, "prompts file").splitlines() == ["what colour?", "which shape?"]


# ---------------------------------------------------------------- 9. config files
@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[fastvv]\nkeep = 0.5\n", "[fastvv] is not a method (did you mean 'fastv'?)"),
        ("[fastv]\nkeeep = 0.5\n", "[fastv] has no setting 'keeep' (did you mean 'keep'?)"),
        (
            "[st3]\nhorizn = 8\n",
            "[st3] has no setting 'horizn' (did you mean 'horizon'?)",
        ),  # not the method run
        ("[pdrop]\nratio = 'half'\n", "pdrop.ratio='half' must be a number"),
        ("keep = 0.5\n", "'keep' is not a [method-name] table"),
    ],
)
def test_config_tables_are_all_checked(capsys, no_model_load, picture, tmp_path, toml, message):
    config = tmp_path / "methods.toml"
    config.write_text(toml)
    code, _, err = run_cli(capsys, *run_args("tiny", picture, "--method", "fastv", "--config", str(config)))
    one_line_error(code, err, message)


def test_config_file_must_be_utf8(capsys, no_model_load, picture, tmp_path):
    config = tmp_path / "methods.toml"
    config.write_bytes("[fastv]\n# caf\xe9\nkeep = 0.5\n".encode("latin-1"))
    code, _, err = run_cli(capsys, *run_args("tiny", picture, "--config", str(config)))
    one_line_error(code, err, "is not UTF-8 text (byte 0xe9 on line 2)")


# ---------------------------------------------------------------- 11. start-up
PROBE = """
import sys
from vistrim.cli.main import main
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted({{"torch", "transformers"}} & set(sys.modules)))
"""


def test_usage_errors_do_not_import_torch_or_transformers(tmp_path):
    argvs = [
        ["--help"],
        ["run", "--help"],
        ["frobnicate"],
        ["run", "--image", "x.png"],  # --prompt missing
        ["run", "--image", str(tmp_path / "missing.png"), "--prompt", "q"],
        ["run", "--image", "x.png", "--prompt", "q", "--max-new-tokens", "0"],
        ["run", "--image", "x.png", "--prompt", "q", "--json", str(tmp_path)],
        ["bench", "--repeats", "0"],
        ["eval", "--out", str(tmp_path / "a" / "b"), "--batch-size", "0"],
    ]
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(argvs=argvs)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    assert result.stderr.count("vistrim: error:") == len(argvs) - 2  # both --help print usage instead
