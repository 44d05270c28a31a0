"""Greedy answers of a (trimmed) model over labelled easy-vqa items, and the arithmetic on them.

Generation is batched and left-padded; a method runs inside ``vistrim.trim`` and the visual tokens it
actually reached are read from ``session.stats`` after every batch. Prompts go through the
processor's chat template, so a real LLaVA checkpoint works unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..api import trim
from ..data.easyvqa import QTYPES, VQAItem, build_prompt, load_image, normalize_answer
from ..data.shapes import QTYPES as SCENE_QTYPES
from ..data.shapes import size_bin, size_bins


@dataclass
class Answers:
    """Per item: the generated text, the first-token logits (float32, CPU) and the layer-averaged
    visual tokens its prefill reached (also counted post-cut); per batch: the run statistics'
    summary (None unpruned)."""

    texts: list[str] = field(default_factory=list)
    first_logits: list[torch.Tensor] = field(default_factory=list)
    reached: list[float] = field(default_factory=list)
    reached_post_cut: list[float] = field(default_factory=list)  # the same, counted post-cut
    batches: list[dict | None] = field(default_factory=list)


def render_prompt(processor, text: str) -> str:
    """A prompt holding the image placeholder is used as written; otherwise the processor's chat
    template (one image, then the text), or ``<image>\\n{text}`` when it has none."""
    token = getattr(processor, "image_token", "<image>")
    if token in text:
        return text
    if getattr(processor, "chat_template", None):
        return build_prompt(processor, text)
    return f"{token}\n{text}"


def encode(processor, images: Sequence, prompts: Sequence[str], model):
    """Left-padded model inputs for one batch (generation appends on the right of every row)."""
    processor.tokenizer.padding_side = "left"
    texts = [render_prompt(processor, p) for p in prompts]
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def visual_counts(model, inputs) -> torch.Tensor:
    """(B,) prunable visual tokens in each prompt, as the model's family finds them."""
    from ..families import family_for

    return family_for(model).layout(inputs["input_ids"], dict(inputs)).visual.sum(-1)


@torch.inference_mode()
def generate_batch(model, inputs, max_new_tokens: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy new tokens per row (up to EOS) and the first generated step's logits (B, V)."""
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    return list(new), out.logits[0].float().cpu()


def answer(
    model,
    processor,
    batches: Sequence[tuple[Sequence, Sequence[str]]],
    method=None,
    max_new_tokens: int = 2,
    advance: Callable[[int], None] | None = None,
) -> Answers:
    """Greedy answers for ``batches`` of (images, prompts); ``method`` None runs the plain model."""
    result = Answers()
    for images, prompts in batches:
        inputs = encode(processor, images, prompts, model)
        torch.manual_seed(0)  # the same answers in every run, whatever ran before
        scope = trim(model, method) if method is not None else contextlib.nullcontext()
        with scope as session:
            tokens, logits = generate_batch(model, inputs, max_new_tokens)
        result.texts += [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
        result.first_logits += list(logits)
        stats = session.stats if session is not None else None
        reached = stats.layer_average() if stats is not None else visual_counts(model, inputs).double()
        result.reached += reached.tolist()
        post_cut = stats.layer_average("post_cut") if stats is not None else reached
        result.reached_post_cut += post_cut.tolist()
        result.batches.append(stats.summary() if stats is not None else None)
        if advance is not None:
            advance(len(prompts))
    return result


# LLaVA-1.5's instruction for short-answer VQA; the test-bed was trained on bare questions.
SHORT_ANSWER = "Answer the question using a single word or phrase."
BARE_QUESTION_MODELS = ("testbed", "testbed2", "tiny")


def default_instruction(model_spec: str) -> str:
    return "" if model_spec in BARE_QUESTION_MODELS else SHORT_ANSWER


def item_batches(
    items: Sequence[VQAItem], batch_size: int, instruction: str = "", image: Callable | None = None
) -> list[tuple[list, list[str]]]:
    """(images, questions) per batch of labelled items, in order; ``instruction`` goes on a line
    after each question; ``image`` maps an item to its image (default :func:`item_image`)."""
    image = image or item_image
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    suffix = f"\n{instruction}" if instruction else ""
    return [([image(it) for it in c], [it.question + suffix for it in c]) for c in chunks]


def item_image(item):
    """The item's image: its own ``load_image()`` (generated scenes) or the file at ``image_path``."""
    loader = getattr(item, "load_image", None)
    return loader() if callable(loader) else load_image(item.image_path)


# ---------------------------------------------------------------------- arithmetic (pure)
def score(items: Sequence[VQAItem], texts: Sequence[str]) -> list[bool]:
    """Exact match of the first answer word."""
    return [normalize_answer(t) == normalize_answer(it.answer) for it, t in zip(items, texts, strict=True)]


def accuracy_summary(items: Sequence[VQAItem], correct: Sequence[bool]) -> dict:
    """``{"accuracy", "n", "by_type": {qtype: {"accuracy", "n"}}}`` (absent types left out), plus
    ``"by_size"`` (accuracy per bin of the answer object's area in patches) when items carry a size."""
    order = dict.fromkeys([*QTYPES, *SCENE_QTYPES, *sorted({it.qtype for it in items})])
    summary = {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "by_type": group_accuracy(items, correct, lambda it: it.qtype, order),
    }
    if any(getattr(it, "size", None) is not None for it in items):
        summary["by_size"] = group_accuracy(items, correct, lambda it: size_bin(it.size), size_bins())
    return summary


def group_accuracy(items, correct, key, order) -> dict:
    """``{group: {"accuracy", "n"}}`` over the groups in ``order`` that occur (``key`` None: skipped)."""
    groups: dict = {}
    for it, c in zip(items, correct):
        groups.setdefault(key(it), []).append(c)
    return {
        g: {"accuracy": sum(groups[g]) / len(groups[g]), "n": len(groups[g])} for g in order if g in groups
    }


def relative(value: float, reference: float) -> float | None:
    """``value / reference``; None when the reference is 0 (no meaningful ratio)."""
    return value / reference if reference else None


def mean(values: Sequence[float]) -> float:
    return sum(values) / max(1, len(values))


def config_summary(
    items: Sequence[VQAItem], texts: Sequence[str], reached: Sequence[float], reference_accuracy: float
) -> dict:
    """Accuracy (overall and per question type), relative accuracy and the layer-averaged visual
    tokens reached, averaged over every sample of every batch."""
    correct = score(items, texts)
    summary = accuracy_summary(items, correct)
    return {
        **summary,
        "relative_accuracy": relative(summary["accuracy"], reference_accuracy),
        "layer_average_visual": mean(reached),
        "answers": list(texts),
        "correct": correct,
        "reached_per_sample": list(reached),
    }
