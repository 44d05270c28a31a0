"""Train the easy-vqa LLaVA test-bed and write it, with processor and model card, to ``--out``.

End-to-end training from scratch on CPU stalls at the answer prior (the language model learns to
ignore an image encoder that has not learnt anything yet), so training has two stages:

a. the CLIP vision tower alone, with supervised heads: shape and colour classifiers on the CLS token
   of the feature layer (-2) and of the final pooled output, a shape classifier on the mean patch
   token, and per-patch classifiers (background or shape colour; the shape, on patches the shape
   covers) that keep the patch tokens local and give shape learning a dense signal;
b. projector + language model (tower at a lower learning rate), next-token loss on the answer word
   and ``</s>`` only, on the dataset's questions plus balanced synthetic yes/no questions, with a
   training-only probe that teaches the word-vs-image comparison yes/no questions need.

Stage b shares work between the ~10 questions asked about each image: the image prefix
``USER: <image>`` is run once, its key/value cache is replicated per question, and only the short
question/answer suffixes are run on top. This is the same computation as running every full
sequence (causal attention, same positions), about six times cheaper.

Usage::

    python scripts/train_testbed.py --out src/vistrim/assets/testbed  # shipped model, ~52 min on 2 cores
    python scripts/train_testbed.py --tiny --vision-steps 2 --lm-steps 2 --out /tmp/tb  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

# The cores are shared: with busy-waiting OpenMP threads a training step was up to 8x slower whenever
# another process was computing. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import Progress
from torch import nn

from vistrim.compat import cache_kwargs, output_cache
from vistrim.data.easyvqa import COLORS, SHAPES, VQAItem, batched_accuracy, build_prompt, load_split, words_of
from vistrim.models.testbed import TINY_SIZE, TestbedSize, build_testbed
from vistrim.models.tokenizer import IMAGE_TOKEN

PALETTE = {  # easy-vqa draws every shape in one of these exact colours
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
assert tuple(PALETTE) == COLORS
IGNORE = -100


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------- data


def group_by_image(items: list[VQAItem], max_images: int | None) -> dict[str, list[VQAItem]]:
    groups: dict[str, list[VQAItem]] = defaultdict(list)
    for item in items:
        groups[item.image_path].append(item)
    paths = sorted(groups)[:max_images]
    return {path: groups[path] for path in paths}


def shape_label(items: list[VQAItem]) -> int:
    """The image's shape from its questions (direct answers, or yes/no evidence); IGNORE if unknown."""
    present, absent = set(), set()
    for item in items:
        if item.answer in SHAPES:
            present.add(item.answer)
            continue
        words = words_of(item.question)
        named = [w for w in words if w in SHAPES]
        if item.qtype != "yesno" or not named:
            continue
        negated = "not" in words or "no" in words
        (present if (item.answer == "yes") != negated else absent).add(named[0])
    if not present and len(absent) == len(SHAPES) - 1:
        present = set(SHAPES) - absent
    return SHAPES.index(present.pop()) if len(present) == 1 else IGNORE


def colour_targets(path: str, image_size: int, patch_size: int) -> tuple[int, torch.Tensor]:
    """Image colour (exact palette match) and per-patch labels: 0 background, 1 + colour on the shape."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    counts = [int((rgb == np.array(c)).all(-1).sum()) for c in PALETTE.values()]
    colour = int(np.argmax(counts))
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # one int per colour: fast mode
    values, freq = np.unique(packed, return_counts=True)
    top = values[freq.argmax()]
    background = np.array([top >> 16, (top >> 8) & 255, top & 255])
    # Anti-aliased edge pixels count as shape when closer to the shape colour than to the background.
    fg = ((rgb - PALETTE[COLORS[colour]]) ** 2).sum(-1) < ((rgb - background) ** 2).sum(-1)
    mask = torch.tensor(fg, dtype=torch.float32)[None, None]
    mask = F.interpolate(mask, size=(image_size, image_size), mode="bilinear", align_corners=False)
    frac = F.avg_pool2d(mask, patch_size)[0, 0]
    return colour, torch.where(frac >= 0.5, colour + 1, 0)


def prepare_images(processor, groups: dict[str, list[VQAItem]], size: TestbedSize) -> dict[str, torch.Tensor]:
    """Pixel values through the real processor, plus the stage-a targets, for every training image."""
    paths = list(groups)
    pixels = []
    for start in range(0, len(paths), 256):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + 256]]
        pixels.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    colours, patches = zip(*(colour_targets(p, size.image_size, size.patch_size) for p in paths))
    return {
        "pixels": torch.cat(pixels),
        "shape": torch.tensor([shape_label(groups[p]) for p in paths]),
        "colour": torch.tensor(colours),
        "patch": torch.stack(patches),
    }


def yesno_templates(items: list[VQAItem]) -> dict[str, list[str]]:
    """The dataset's own yes/no question templates, by the kind of word they ask about."""
    templates: dict[str, set[str]] = {"color": set(), "shape": set()}
    for item in items:
        words = words_of(item.question)
        for kind, vocab in (("color", COLORS), ("shape", SHAPES)):
            named = [w for w in words if w in vocab]
            if item.qtype == "yesno" and named:
                templates[kind].add(item.question.replace(named[0], "{}", 1))
    return {kind: sorted(t) for kind, t in templates.items()}


def synthesize_yesno(
    groups: dict[str, list[VQAItem]], data: dict, per_image: int, seed: int
) -> dict[str, list[VQAItem]]:
    """Extra yes/no questions per training image, half of them naming the image's own colour/shape.

    Only ~18% of the dataset's yes/no questions name the image's own attribute, too few for the
    language model to learn the comparison in a CPU budget (two full runs stalled on answering
    from the wording). These use the dataset's own templates and the training labels (colour from
    the exact pixels, shape from the training questions; images of unknown shape get colour only).
    """
    rng = random.Random(seed)
    templates = yesno_templates([item for items in groups.values() for item in items])
    out = {}
    for i, (path, items) in enumerate(groups.items()):
        own = {"color": COLORS[data["colour"][i]]}
        if data["shape"][i] != IGNORE:
            own["shape"] = SHAPES[data["shape"][i]]
        extra = []
        for k in range(per_image):
            kind = rng.choice(sorted(own))
            vocab = COLORS if kind == "color" else SHAPES
            word = own[kind] if k % 2 == 0 else rng.choice([w for w in vocab if w != own[kind]])
            question = rng.choice(templates[kind]).format(word)
            answer = "yes" if (word == own[kind]) != is_negated(question) else "no"
            extra.append(VQAItem(question, answer, path, "yesno"))
        out[path] = items + extra
    return out


def encode_questions(processor, groups: dict[str, list[VQAItem]]) -> tuple[list[int], list[list[list[int]]]]:
    """The shared image prefix ids and, per image, the token ids of each question+answer suffix."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    suffixes, head = [], None
    for items in groups.values():
        per_image = []
        for item in items:
            ids = tokenizer(f"{build_prompt(processor, item.question)} {item.answer}</s>")["input_ids"]
            cut = ids.index(image_id) + 1
            assert head in (None, ids[:cut]), "every prompt must share the same image prefix"
            head, answer = ids[:cut], ids[-2:]
            assert answer == tokenizer(f"{item.answer}</s>")["input_ids"], item
            per_image.append(ids[cut:])
        suffixes.append(per_image)
    # The processor expands the single <image> into one token per visual feature: take its prefix.
    sample = next(iter(groups.values()))[0]
    text = build_prompt(processor, sample.question)
    expanded = processor(images=[Image.open(sample.image_path).convert("RGB")], text=[text])["input_ids"][0]
    cut = len(expanded) - expanded[::-1].index(image_id)
    prefix = expanded[:cut]
    assert prefix[: len(head) - 1] == head[:-1] and set(prefix[len(head) - 1 :]) == {image_id}
    return prefix, suffixes


def augment(pixels: torch.Tensor, patch: torch.Tensor | None, gen: torch.Generator):
    """Random horizontal mirroring; per-patch labels follow.

    Only mirroring keeps images in distribution: easy-vqa triangles always point up, so rotations
    would only teach orientations the test set never shows.
    """
    flip = torch.rand(len(pixels), generator=gen) < 0.5
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    if patch is not None:
        patch = torch.where(flip[:, None, None], patch.flip(-1), patch)
    return pixels, patch


# ----------------------------------------------------------------------------------------- stage a


class VisionHeads(nn.Module):
    """Supervised heads that give the vision tower shape/colour-aware features (dropped after stage a)."""

    def __init__(self, hidden: int):
        super().__init__()
        n_shape, n_colour = len(SHAPES), len(COLORS)
        self.norm = nn.LayerNorm(hidden)  # the feature layer output is the raw (un-normalised) stream
        self.cls = nn.Linear(hidden, n_shape + n_colour)
        self.pooled = nn.Linear(hidden, n_shape + n_colour)
        self.mean_patch = nn.Linear(hidden, n_shape)
        self.patch = nn.Linear(hidden, 1 + n_colour)
        self.patch_shape = nn.Linear(hidden, n_shape)

    def loss(self, tower: nn.Module, pixels: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict:
        out = tower(pixel_values=pixels, output_hidden_states=True)
        feats = self.norm(out.hidden_states[-2])  # the layer LLaVA reads (vision_feature_layer=-2)
        n_shape = len(SHAPES)

        def shape_colour(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = F.cross_entropy(logits[:, :n_shape], batch["shape"], ignore_index=IGNORE)
            return s, F.cross_entropy(logits[:, n_shape:], batch["colour"])

        cls_s, cls_c = shape_colour(self.cls(feats[:, 0]))
        pool_s, pool_c = shape_colour(self.pooled(out.pooler_output))
        mean_s = F.cross_entropy(self.mean_patch(feats[:, 1:].mean(1)), batch["shape"], ignore_index=IGNORE)
        patch_logits = self.patch(feats[:, 1:])
        patch = F.cross_entropy(patch_logits.flatten(0, 1), batch["patch"].flatten())
        # Dense shape supervision: every patch on the shape learns the shape (edges are local cues).
        on_shape = batch["patch"].flatten(1) > 0
        patch_shape_target = torch.where(on_shape, batch["shape"][:, None], IGNORE)
        patch_shape_logits = self.patch_shape(feats[:, 1:])
        patch += F.cross_entropy(
            patch_shape_logits.flatten(0, 1), patch_shape_target.flatten(), ignore_index=IGNORE
        )
        with torch.no_grad():
            known = batch["shape"] != IGNORE
            cls_logits = self.cls(feats[:, 0])
            shape_acc = (cls_logits[known, :n_shape].argmax(-1) == batch["shape"][known]).float().mean()
            colour_acc = (cls_logits[:, n_shape:].argmax(-1) == batch["colour"]).float().mean()
        total = cls_s + cls_c + pool_s + pool_c + mean_s + patch
        return {"loss": total, "patch": patch, "shape_acc": shape_acc, "colour_acc": colour_acc}


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled index batches (a fresh permutation each epoch)."""
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train_vision(model, data: dict, args, gen: torch.Generator, progress: Progress) -> None:
    tower = model.model.vision_tower
    heads = VisionHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vision_steps, args.warmup))
    tower.train()
    task = progress.add_task("stage a: vision tower", total=args.vision_steps)
    index = batches(len(data["pixels"]), args.vision_batch, gen)
    for step in range(args.vision_steps):
        idx = next(index)
        pixels, patch = augment(data["pixels"][idx], data["patch"][idx], gen)
        batch = {"shape": data["shape"][idx], "colour": data["colour"][idx], "patch": patch}
        out = heads.loss(tower, pixels, batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        progress.advance(task)
        if step % args.log_every == 0 or step == args.vision_steps - 1:
            log(
                f"vision step {step}: loss {out['loss'].item():.3f} patch {out['patch'].item():.3f} "
                f"shape acc {out['shape_acc'].item():.3f} colour acc {out['colour_acc'].item():.3f}"
            )
    tower.eval()


# ----------------------------------------------------------------------------------------- stage b


def is_negated(question: str) -> bool:
    words = words_of(question)
    return "not" in words or "no" in words


def matches_image(item: VQAItem) -> bool:
    """Whether a yes/no question's colour/shape is the one in the image (negations undone).

    Only ~18% of yes/no questions name the image's own colour/shape, so "positive wording -> no,
    negated wording -> yes" is right 82% of the time without looking at the image (the first full
    run stalled on that shortcut at ~87%); :func:`synthesize_yesno` balances the answers and
    :class:`MatchProbe` teaches the comparison.
    """
    return item.qtype == "yesno" and (item.answer == "yes") != is_negated(item.question)


def named_word_position(suffix: list[int], attribute_ids: set[int]) -> int:
    """Index in a question suffix of the colour/shape word a yes/no question names (-1: none)."""
    hits = [k for k, token in enumerate(suffix[:-2]) if token in attribute_ids]
    return hits[-1] if hits else -1


def collate_questions(suffixes: list[list[list[int]]], image_idx: list[int], pad_id: int):
    """Right-padded question+answer suffixes of the given images with answer-only labels, and the
    index of each row's image within ``image_idx``."""
    rows, owner = [], []
    for position, i in enumerate(image_idx):
        rows += suffixes[i]
        owner += [position] * len(suffixes[i])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, len(row) - 2 : len(row)] = torch.tensor(row[-2:])  # answer word + </s>
    return ids, labels, torch.tensor(owner)


class MatchProbe(nn.Module):
    """Training-only scaffold (discarded afterwards): at the colour/shape word of a yes/no question,
    a linear probe on one middle layer's hidden state predicts whether the image has that colour/shape.

    Why: a yes/no answer is (named word == image attribute) XOR negation. Supervised on the answer
    alone this is a two-hop composition (compare the word with the image, then carry the result to
    the answer position) with no first-order signal. Earlier full runs without the probe (lr 1e-3)
    answered yes/no from the wording alone, and so did a text-only control in which the "image" was
    the two words themselves (chance for 600 steps); with the probe and lr 3e-4 that control reached
    100% in 400 steps. The probe gives the first hop a direct signal; the answer loss learns the second.
    """

    def __init__(self, hidden: int, layer: int):
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(hidden, 1)

    def loss(self, hidden_states, where: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
        rows = (where >= 0).nonzero().squeeze(-1)
        if len(rows) == 0:
            return hidden_states[0].sum() * 0
        h = hidden_states[self.layer][rows, where[rows]]
        return F.binary_cross_entropy_with_logits(self.head(h).squeeze(-1), match[rows].float())


def answer_loss(
    model, pixels, prefix, ids, labels, weights, owner, probe=None, where=None, match=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted loss on answer tokens, the match-probe loss and per-question correctness; the image
    prefix runs once per image and its key/value cache is shared by that image's questions."""
    prefix_ids = torch.tensor(prefix).expand(len(pixels), -1)
    cache = output_cache(model(input_ids=prefix_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1))
    cache.batch_select_indices(owner)  # one copy of the image's keys/values per question (differentiable)
    # Right padding is harmless: pads come after the answer, and attention is causal.
    out = model(
        input_ids=ids, **cache_kwargs(model, cache), use_cache=True, output_hidden_states=probe is not None
    )
    # The last prefix position predicts the first suffix token, which is never an answer: skip it.
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    token_weights = weights[:, None] * (targets != IGNORE)
    loss = (token_loss * token_weights).sum() / token_weights.sum()
    probe_loss = probe.loss(out.hidden_states, where, match) if probe is not None else loss * 0
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) | (targets == IGNORE)).all(-1)
    return loss, probe_loss, correct


def train_language(
    model, data: dict, prefix, suffixes, matching, positions, args, gen: torch.Generator, progress: Progress
):
    tower = model.model.vision_tower
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    text = model.config.text_config
    probe = MatchProbe(text.hidden_size, args.probe_layer or text.num_hidden_layers // 2)
    rest += list(probe.parameters())
    groups = [{"params": rest, "lr": args.lm_lr}]
    if args.tower_lr_scale > 0:
        groups.append({"params": list(tower.parameters()), "lr": args.lm_lr * args.tower_lr_scale})
    else:
        tower.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.lm_steps, args.warmup))
    model.train()
    pad_id = model.generation_config.pad_token_id
    task = progress.add_task("stage b: projector + LM", total=args.lm_steps)
    index = batches(len(suffixes), args.lm_images, gen)
    for step in range(args.lm_steps):
        idx = next(index)
        pixels, _ = augment(data["pixels"][idx], None, gen)
        ids, labels, owner = collate_questions(suffixes, idx.tolist(), pad_id)
        matched = torch.tensor([m for i in idx.tolist() for m in matching[i]])
        where = torch.tensor([w for i in idx.tolist() for w in positions[i]])
        weights = torch.where(matched, args.match_weight, 1.0)
        loss, probe_loss, correct = answer_loss(
            model,
            pixels,
            prefix,
            ids,
            labels,
            weights,
            owner,
            probe if args.probe_weight else None,
            where,
            matched,
        )
        opt.zero_grad(set_to_none=True)
        (loss + args.probe_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        progress.advance(task)
        if step % args.log_every == 0 or step == args.lm_steps - 1:
            log(
                f"lm step {step}: loss {loss.item():.4f} probe {probe_loss.item():.4f} answer acc "
                f"{correct.float().mean().item():.3f} "
                f"yes/no acc {correct[where >= 0].float().mean().item():.3f} "
                f"({len(ids)} questions)"
            )
    tower.requires_grad_(True)
    model.eval()


# ----------------------------------------------------------------------------------------- card


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def blind_baseline(train: list[VQAItem], test: list[VQAItem]) -> dict:
    """Accuracy without the image: yes/no from the wording alone ("is there a X?" -> no, negated ->
    yes), shape/colour questions -> the most frequent training answer. The floor a blank image
    should fall to."""
    common = {
        t: Counter(i.answer for i in train if i.qtype == t).most_common(1)[0][0] for t in ("shape", "color")
    }

    def guess(item: VQAItem) -> str:
        if item.qtype != "yesno":
            return common[item.qtype]
        return "yes" if is_negated(item.question) else "no"

    by_type = {}
    for qtype in ("shape", "color", "yesno"):
        items = [i for i in test if i.qtype == qtype]
        if items:
            by_type[qtype] = {
                "accuracy": sum(guess(i) == i.answer for i in items) / len(items),
                "n": len(items),
            }
    correct = sum(m["accuracy"] * m["n"] for m in by_type.values())
    return {"accuracy": correct / len(test), "n": len(test), "by_type": by_type}


def format_metrics(metrics: dict) -> str:
    rows = [f"| all | {metrics['accuracy']:.2%} | {metrics['n']} |"]
    rows += [f"| {t} | {m['accuracy']:.2%} | {m['n']} |" for t, m in metrics["by_type"].items()]
    return "| questions | accuracy | n |\n|---|---|---|\n" + "\n".join(rows)


def write_card(out: Path, model, args, timings: dict, metrics: dict | None) -> None:
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    n_visual = (v.image_size // v.patch_size) ** 2
    parts = {
        "vision tower": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
        "language model": count(model.model.language_model) + count(model.lm_head),
    }
    params = "\n".join(f"| {k} | {n:,} |" for k, n in parts.items())
    if metrics:
        results = (
            f"Greedy generation (`max_new_tokens=2`), exact match of the first decoded word.\n\n"
            f"Easy-vqa test split:\n\n{format_metrics(metrics['test'])}\n\n"
            "Same questions with a blank image (uniform gray, no shape):\n\n"
            f"{format_metrics(metrics['blank'])}\n\n"
            "Blind baseline for comparison (no image: yes/no from the wording alone, `is there a X?` -> no,\n"
            "negated -> yes; shape/colour -> the most frequent training answer). Only ~18% of easy-vqa\n"
            "yes/no questions name the image's own colour/shape, so this floor is well above 50%:\n\n"
            f"{format_metrics(metrics['blind'])}\n"
        )
    else:
        results = "Not evaluated (run without `--no-eval` to measure).\n"
    card = f"""# vistrim easy-vqa test-bed

A small **stock `LlavaForConditionalGeneration`** trained on [easy-vqa](https://pypi.org/project/easy-vqa/)
so that visual-token pruning methods can be measured on a real LLaVA whose answers depend on the image.
Load with `vistrim.models.testbed.load_testbed()` or `LlavaForConditionalGeneration.from_pretrained(path)` +
`AutoProcessor.from_pretrained(path)`.

## Architecture

- Vision: CLIP vision tower, {v.image_size}x{v.image_size} images, patch {v.patch_size} -> {n_visual} patch
  tokens + CLS, hidden {v.hidden_size}, MLP {v.intermediate_size}, {v.num_hidden_layers} layers,
  {v.num_attention_heads} heads. LLaVA reads layer {cfg.vision_feature_layer} with the
  `{cfg.vision_feature_select_strategy}` strategy (CLS dropped): **{n_visual} visual tokens per image**.
- Projector: Linear-GELU-Linear, {v.hidden_size} -> {t.hidden_size}.
- Language model: Llama, hidden {t.hidden_size}, MLP {t.intermediate_size}, {t.num_hidden_layers} layers,
  {t.num_attention_heads} query heads / {t.num_key_value_heads} key-value heads (GQA), vocabulary
  {t.vocab_size} words (word-level tokenizer over the easy-vqa questions, answers and prompt words).
- Prompt: `USER: <image>\\n{{question}} ASSISTANT:`; the answer is one word followed by `</s>`.

| part | parameters |
|---|---|
{params}
| total | {count(model):,} |

Weights: fp32 safetensors.

## Data

easy-vqa (PyPI `easy-vqa`): 64x64 images of one coloured shape (3 shapes, 8 colours), questions about
the shape, the colour, or yes/no (with negations); 13 answers. Training used the **train split only**
({timings["train_questions"]:,} questions on {timings["train_images"]:,} images); the test split
(9,673 questions on 1,000 unseen images) is used only for the numbers below.

## Training recipe

Two stages, because end-to-end training from scratch on CPU stalls at the answer prior:

1. Vision tower alone ({args.vision_steps} steps, batch {args.vision_batch}, AdamW lr {args.vision_lr},
   cosine schedule): shape + colour classifiers on the layer -2 CLS token and on the final pooled output,
   a shape classifier on the mean patch token, per-patch background/colour and on-shape shape
   classifiers. Shape labels come from the training questions, colour labels from the exact palette
   colours in the image.
   Random horizontal mirroring. The heads are discarded afterwards.
2. Projector + language model ({args.lm_steps} steps of {args.lm_images} images with all their questions,
   AdamW lr {args.lm_lr}, vision tower at {args.tower_lr_scale} x that lr, cosine schedule), cross-entropy
   on the answer word and `</s>` only (weighted {args.match_weight}x on yes/no questions naming the image's
   own colour/shape). Only ~18% of easy-vqa yes/no questions name the image's own colour/shape, so
   {args.synthetic_per_image} extra yes/no questions per image from the dataset's own templates, half of
   them naming the image's colour/shape, balance the answers. A training-only linear probe (weight
   {args.probe_weight}, discarded afterwards) on the hidden state of layer {args.probe_layer or "L/2"} at
   the named colour/shape word predicts whether the image has it: without it, yes/no questions stayed
   at the wording-only prior. Same augmentation.

- Seed: {args.seed}; command: `{timings["command"]}`
- Training wall time: {timings["vision_s"] / 60:.1f} min (stage 1) + {timings["lm_s"] / 60:.1f} min
  (stage 2) = {(timings["vision_s"] + timings["lm_s"]) / 60:.1f} min
- Hardware: {timings["cpu"]}, {torch.get_num_threads()} threads (CPU only; the cores were shared with
  other work), torch {torch.__version__}

## Results

{results}"""
    (out / "MODEL_CARD.md").write_text(card)


# ----------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (model, processor, card)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny geometry for smoke tests (not a useful model)")
    p.add_argument("--max-images", type=int, default=None, help="train on the first N train images only")
    p.add_argument("--vision-steps", type=int, default=800)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--vision-lr", type=float, default=1e-3)
    p.add_argument("--lm-steps", type=int, default=2000)
    p.add_argument("--lm-images", type=int, default=8, help="images per step (with all their questions)")
    p.add_argument("--lm-lr", type=float, default=3e-4)
    p.add_argument("--synthetic-per-image", type=int, default=8, help="extra yes/no questions per image")
    p.add_argument("--match-weight", type=float, default=1.0, help="loss weight of matching yes/no questions")
    p.add_argument("--probe-weight", type=float, default=1.0, help="weight of the match-probe loss (0: off)")
    p.add_argument(
        "--probe-layer", type=int, default=0, help="hidden-state layer the probe reads (0: middle)"
    )
    p.add_argument("--tower-lr-scale", type=float, default=0.1, help="0 freezes the tower in stage b")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test questions")
    p.add_argument("--no-eval", action="store_true", help="skip the test-set and blank-image evaluation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    size = TINY_SIZE if args.tiny else TestbedSize()
    model, processor = build_testbed(args.seed, size)

    groups = group_by_image(load_split("train"), args.max_images)
    log(f"preparing {len(groups)} train images")
    data = prepare_images(processor, groups, size)
    log(f"shape labels known for {(data['shape'] != IGNORE).sum().item()}/{len(groups)} images")
    questions = synthesize_yesno(groups, data, args.synthetic_per_image, args.seed)
    prefix, suffixes = encode_questions(processor, questions)
    matching = [[matches_image(item) for item in items] for items in questions.values()]
    attribute_ids = set(processor.tokenizer.convert_tokens_to_ids([*COLORS, *SHAPES]))
    positions = [
        [
            named_word_position(suffix, attribute_ids) if item.qtype == "yesno" else -1
            for item, suffix in zip(items, row)
        ]
        for items, row in zip(questions.values(), suffixes)
    ]

    timings = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cpu": cpu_name(),
        "train_images": len(groups),
        "train_questions": sum(map(len, groups.values())),
        "synthetic_questions": sum(map(len, suffixes)) - sum(map(len, groups.values())),
    }
    with Progress() as progress:
        start = time.perf_counter()
        train_vision(model, data, args, gen, progress)
        timings["vision_s"] = time.perf_counter() - start
        start = time.perf_counter()
        train_language(model, data, prefix, suffixes, matching, positions, args, gen, progress)
        timings["lm_s"] = time.perf_counter() - start
    log(f"training took {timings['vision_s']:.0f}s + {timings['lm_s']:.0f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)

    metrics = None
    if not args.no_eval:
        test = load_split("test")[: args.eval_limit]
        metrics = {
            "blind": blind_baseline(load_split("train"), test),
            "test": batched_accuracy(model, processor, test, batch_size=64),
            "blank": batched_accuracy(model, processor, test, batch_size=64, blank=True),
        }
        log(json.dumps(metrics, indent=1))
    write_card(args.out, model, args, timings, metrics)
    return {"timings": timings, "metrics": metrics}


if __name__ == "__main__":
    main()
