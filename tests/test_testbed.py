"""The shipped easy-vqa test-bed: it loads offline, it is accurate, and its training script runs."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this file may touch the network
# On shared cores busy-waiting OpenMP threads make the timed test several times slower (only
# effective if torch is not loaded yet, e.g. when this file runs alone).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vistrim.data.easyvqa import (
    VQAItem,
    batched_accuracy,
    build_prompt,
    fixed_subset,
    load_split,
    normalize_answer,
    question_type,
)
from vistrim.models.testbed import TESTBED_DIR, load_testbed

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_testbed.py"


def test_shipped_testbed_is_accurate_and_fast():
    start = time.perf_counter()
    model, processor = load_testbed()
    items = fixed_subset(load_split("test"), 300, seed=0)
    result = batched_accuracy(model, processor, items, batch_size=50, progress=False)
    elapsed = time.perf_counter() - start
    assert result["n"] == 300
    assert result["accuracy"] >= 0.95, result
    assert all(m["accuracy"] >= 0.95 for m in result["by_type"].values()), result
    assert elapsed < 60, f"load + 300 questions took {elapsed:.1f}s"


def test_shipped_testbed_answers_from_the_image():
    """With a blank image the answers fall to the prior (full test set: 59.9%, see the model card)."""
    model, processor = load_testbed()
    items = fixed_subset(load_split("test"), 300, seed=0)
    blank = batched_accuracy(model, processor, items, batch_size=50, progress=False, blank=True)
    assert blank["accuracy"] <= 0.70, blank
    assert blank["by_type"]["color"]["accuracy"] <= 0.30 and blank["by_type"]["shape"]["accuracy"] <= 0.50


def test_shipped_testbed_is_a_stock_llava():
    config = LlavaForConditionalGeneration.config_class.from_pretrained(TESTBED_DIR)
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.model_type == "llama"
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.text_config.num_key_value_heads < config.text_config.num_attention_heads
    assert config.text_config.num_hidden_layers >= 8
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 >= 144
    weights = TESTBED_DIR / "model.safetensors"
    assert weights.stat().st_size <= 30 * 2**20
    processor = AutoProcessor.from_pretrained(TESTBED_DIR)
    prompt = build_prompt(processor, "what shape is in the image?")
    assert prompt == "USER: <image>\nwhat shape is in the image? ASSISTANT:"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_testbed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_smoke(tmp_path: Path):
    script = _load_script()
    out = tmp_path / "tb"
    args = ["--tiny", "--out", str(out), "--max-images", "8", "--vision-steps", "2", "--vision-batch", "4"]
    args += ["--lm-steps", "2", "--lm-images", "2", "--warmup", "1", "--eval-limit", "8"]
    report = script.main(args)
    assert report["metrics"]["test"]["n"] == 8
    assert (out / "MODEL_CARD.md").exists()
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    items = load_split("test")[:2]
    inputs = processor(
        images=[Image.new("RGB", (64, 64), "white")] * 2,
        text=[build_prompt(processor, item.question) for item in items],
        return_tensors="pt",
        padding=True,
    )
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2


@pytest.mark.parametrize(
    ("question", "answer", "expected"),
    [
        ("what shape is in the image?", "circle", "shape"),
        ("what is the blue shape?", "triangle", "shape"),
        ("what color is the rectangle?", "teal", "color"),
        ("what is the color of the shape?", "brown", "color"),
        ("is there not a red shape?", "yes", "yesno"),
        ("does the image contain a circle?", "no", "yesno"),
        ("what color is the shape?", "banana", "color"),  # unknown answer: decided by the question
        ("is no gray shape present?", "maybe", "yesno"),
    ],
)
def test_question_type(question: str, answer: str, expected: str):
    assert question_type(question, answer) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("circle", "circle"),
        (" Yes</s>", "yes"),
        ("teal.", "teal"),
        ("<pad>no</s>", "no"),
        ("", ""),
        (" 2</s>", "2"),  # count answers: a number is a word, not nothing
        ("</s>", ""),
    ],
)
def test_normalize_answer(text: str, expected: str):
    assert normalize_answer(text) == expected


def test_fixed_subset_is_deterministic():
    items = [VQAItem(f"q{i}", "yes", "x.png", "yesno") for i in range(50)]
    first = fixed_subset(items, 10, seed=3)
    assert first == fixed_subset(items, 10, seed=3)
    assert len(set(first)) == 10 and first == sorted(first, key=items.index)
