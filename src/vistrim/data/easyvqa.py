"""The easy-vqa dataset (PyPI ``easy-vqa``) as a small API for training and evaluating the test-bed.

easy-vqa images are 64x64 pictures of one coloured shape; every question is about the shape, the
colour, or asks a yes/no question about one of them (negations included). Answers are single words,
so accuracy is an exact match of the first generated word.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

import easy_vqa
import torch
from PIL import Image
from rich.progress import track

Split = Literal["train", "test"]
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
YESNO = ("yes", "no")
QTYPES = ("shape", "color", "yesno")
# Uniform gray: the same 64x64 size as the real images, with no shape in it.
BLANK_COLOR = (128, 128, 128)
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    image_path: str
    qtype: str


def question_type(question: str, answer: str) -> str:
    """``"shape"``, ``"color"`` or ``"yesno"``; the answer vocabulary decides, the question breaks ties."""
    answer = normalize_answer(answer)
    if answer in YESNO:
        return "yesno"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    # Unknown answer (e.g. a model's guess): fall back on the question wording.
    words = words_of(question)
    if words[:1] != ["what"]:
        return "yesno"
    return "color" if "color" in words else "shape"


def normalize_answer(text: str) -> str:
    """The first lower-case word or number of ``text`` (drops special tokens, punctuation and
    whitespace). Numbers count: with letters only, every count answer ("2") normalised to "" and
    matched every guess."""
    text = re.sub(r"<[^>]*>", " ", text.lower())
    match = re.search(r"[a-z0-9]+", text)
    return match.group(0) if match else ""


def words_of(text: str) -> list[str]:
    """Lower-cased word/punctuation split, the same rule as the word-level tokenizer's pre-tokenizer."""
    return _WORD_RE.findall(text.lower())


def load_split(split: Split) -> list[VQAItem]:
    """All question/answer pairs of ``split`` in the dataset's own order."""
    if split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"unknown split {split!r}")
    return [VQAItem(q, a, paths[i], question_type(q, a)) for q, a, i in zip(questions, answers, ids)]


def vocabulary() -> list[str]:
    """Prompt words, then every train-question word, then the answers; deterministic order."""
    questions, _, _ = easy_vqa.get_train_questions()
    words = ["user", ":", "assistant"]
    words += sorted({w for q in questions for w in words_of(q)})
    return words + list(easy_vqa.get_answers())


def fixed_subset(items: list[VQAItem], n: int, seed: int) -> list[VQAItem]:
    """``n`` items drawn without replacement by a seeded RNG, kept in their original order."""
    if n >= len(items):
        return list(items)
    picks = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in picks]


def build_prompt(processor, question: str) -> str:
    """``USER: <image>\\n{question} ASSISTANT:`` rendered through the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_image(path: str, blank: bool = False) -> Image.Image:
    """The RGB image at ``path``, or a uniform gray image of the same size when ``blank``."""
    image = Image.open(path).convert("RGB")
    return Image.new("RGB", image.size, BLANK_COLOR) if blank else image


@torch.inference_mode()
def generate_answers(model, processor, items: list[VQAItem], blank: bool = False) -> list[str]:
    """Greedy answers for one left-padded batch: the answer word plus room for ``</s>``."""
    prompts = [build_prompt(processor, item.question) for item in items]
    images = [load_image(item.image_path, blank) for item in items]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return [normalize_answer(t) for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def batched_accuracy(
    model, processor, items: list[VQAItem], batch_size: int = 64, blank: bool = False, progress: bool = True
) -> dict:
    """Exact-match accuracy of greedy answers, overall and per question type.

    Returns ``{"accuracy", "n", "by_type": {qtype: {"accuracy", "n"}}}``; types absent from
    ``items`` are left out.
    """
    processor.tokenizer.padding_side = "left"  # generation appends to the right end of every row
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if progress:
        batches = track(batches, description="blank-image eval" if blank else "eval")
    correct: dict[str, int] = dict.fromkeys(QTYPES, 0)
    total: dict[str, int] = dict.fromkeys(QTYPES, 0)
    for batch in batches:
        for item, guess in zip(batch, generate_answers(model, processor, batch, blank)):
            total[item.qtype] += 1
            correct[item.qtype] += guess == normalize_answer(item.answer)
    n = sum(total.values())
    by_type = {t: {"accuracy": correct[t] / total[t], "n": total[t]} for t in QTYPES if total[t]}
    return {"accuracy": sum(correct.values()) / max(n, 1), "n": n, "by_type": by_type}
