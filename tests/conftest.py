"""Shared fixtures: the tiny random LLaVA (built from a config, no download) and prompts for it."""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny matrices gain nothing from threads, and spinning threads on a shared CPU cost 100x.
torch.set_num_threads(1)

# The method of docs/adding-a-method.md, written and registered in a test file as a user would:
# imported here so that every registry-driven matrix holds it, whichever test files run in which order.
import test_adding_a_method  # noqa: E402, F401

from vistrim.models.tiny import build_tiny  # noqa: E402

# tests/lmms needs lmms-eval, installed only in its own environment (.ci/run step 3): elsewhere it is
# not collected, and there a run that collects nothing fails (pytest's exit status 5).
collect_ignore_glob = [] if importlib.util.find_spec("lmms_eval") else ["lmms/*"]

PROMPTS = [
    "USER: <image>\nWhat color is the shape? ASSISTANT:",
    "USER: <image>\nwhat ? ASSISTANT:",
    "USER: describe the picture <image>\nis there a red circle in the top left of the photo ? ASSISTANT:",
]


def shape_images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    """A coloured square on a flat background: flat windows that a vision-stage merge can merge."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
        x, y, w = (
            int(rng.integers(0, size // 2)),
            int(rng.integers(0, size // 2)),
            int(rng.integers(8, size // 2)),
        )
        ImageDraw.Draw(image).rectangle(
            (x, y, x + w, y + w), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
        out.append(image)
    return out


def images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def image_token_id() -> int:
    """The tiny LLaVA's image placeholder id, as its family reads it from the config."""
    from vistrim.families import family_for

    model, _ = _tiny_model()
    (token,) = family_for(model).geometry.visual_token_ids
    return token


@functools.cache
def _tiny_model():
    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="session")
def tiny_eager():
    """The same weights with eager attention (the reference for attention rows)."""
    model, processor = build_tiny(seed=0, attn_implementation="eager")
    return model, processor


def encode(processor, prompts, seed: int = 0, **kw):
    return processor(
        images=images(len(prompts), seed), text=list(prompts), return_tensors="pt", padding=True, **kw
    )


@pytest.fixture(scope="session")
def batch(tiny):
    """Three prompts of different lengths, left-padded."""
    return encode(tiny[1], PROMPTS)


def greedy(model, inputs, n: int = 6, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n, **kw)
    return out[:, inputs["input_ids"].shape[1] :]


def _origin(hook) -> str:
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__module__", "") or ""


def no_hooks(model) -> bool:
    """No hook installed by vistrim remains (transformers adds output-capturing hooks of its own)."""
    return not any(
        _origin(hook).startswith("vistrim")
        for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for hook in hooks.values()
    )


def run_cli(capsys, *argv):
    """Run the CLI in-process: (exit code, stdout, stderr); argparse usage errors exit via SystemExit."""
    from vistrim.cli.main import main

    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def pytest_sessionstart(session):
    """The releases under test, in every log (CI runs the suite on more than one transformers)."""
    import importlib.metadata

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        versions = {name: importlib.metadata.version(name) for name in ("transformers", "torch")}
        reporter.write_line("testing with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
