"""Train test-bed 2 (576 visual tokens, 16 layers, small shapes on photos) and write it to ``--out``.

Two stages, as for the first test-bed (end-to-end training from scratch sits on the answer prior):

a. the CLIP vision tower alone, with dense per-patch heads on the layer LLaVA reads (-2): which
   colour covers the patch (or background), which kind of shape (on shape patches), and the patch's
   column and row (so that left/right survives the projector without the language model decoding
   positions from RoPE);
b. projector + language model (tower at a lower learning rate), cross-entropy on the answer word
   and ``</s>`` of every question. All questions about an image ride in one packed sequence: the image prefix
   once, then each question with positions continuing after the prefix and a 4-D mask that lets it
   see the prefix and itself only: the same computation as one sequence per question, ~8x cheaper.

Scenes are generated on the fly from the step number (``vistrim.data.shapes``, train photos only),
so a run resumes exactly from its last checkpoint (``--resume``; written every
``--checkpoint-every`` steps). Training photos come from scikit-image and scikit-learn (install
them for training only) unless ``--photo-dir`` names a folder of JPEGs.

Usage::

    nohup python scripts/train_testbed2.py --out /tmp/tb2 --resume > /tmp/tb2.log 2>&1 &
    python scripts/train_testbed2.py --tiny --vision-steps 2 --lm-steps 2 --out /tmp/t  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Shared cores: busy-waiting OpenMP threads slow everyone down. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistrim.data import shapes
from vistrim.data.easyvqa import build_prompt
from vistrim.evaluate.harness import accuracy_summary, answer, item_batches, score
from vistrim.models.testbed2 import TINY2_SIZE, Testbed2Size, build_testbed2
from vistrim.models.tokenizer import IMAGE_TOKEN

IGNORE = -100
# log(mass + MASS_FLOOR) is the mass head's target; background patches are also set apart by the
# colour and kind features, so the floor only needs to be well below the mass of a covered patch.
MASS_FLOOR = 1e-3
MASS_WEIGHT_FLOOR = 0.01  # the mass loss's weight on a patch is its true mass plus this
LM_OFFSET = 10_000_000  # stage b draws scenes from a different part of the train stream
# Loss weight per question type: colour and relation questions are rarer (they need a unique kind).
TYPE_WEIGHT = {"color": 1.5, "shape": 1.0, "presence": 1.0, "count": 1.0, "relation": 2.5}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pixels_of(processor, images) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


# ----------------------------------------------------------------------------------------- stage a
def centre_patches(scene: shapes.Scene, grid: int) -> list[int]:
    """Raster index of the patch holding the centre of every shape's box (one patch per object)."""
    return [
        int((s.box[1] + s.box[3]) / 2 // shapes.PATCH_SIZE) * grid + int(s.center_x // shapes.PATCH_SIZE)
        for s in scene.shapes
    ]


def patch_targets(scene: shapes.Scene, grid: int) -> tuple[torch.Tensor, ...]:
    """Per patch (raster order): colour class (0 background, 1 + colour), kind (IGNORE off shapes),
    whether it holds a shape's centre, and two scene-level facts written onto the shape's own
    patches (IGNORE off shapes): its side rank (0 leftmost shape, 1 rightmost, 2 between, by box
    centre) and how many shapes of its kind the scene holds, less one. A patch belongs to the shape
    covering most of it, if that shape covers at least 30%. Last, (patches, kinds): the log of every
    kind's object mass on the patch (:func:`kind_mass`) plus ``MASS_FLOOR``."""
    cover = shapes.patch_coverage(scene)
    best, share = cover.argmax(0), cover.max(0)
    on = share >= 0.3
    colour = np.array([shapes.COLORS.index(s.color) + 1 for s in scene.shapes])[best]
    kind = np.array([shapes.KINDS.index(s.kind) for s in scene.shapes])[best]
    xs = [s.center_x for s in scene.shapes]
    rank = np.full(len(xs), 2)
    rank[int(np.argmax(xs))], rank[int(np.argmin(xs))] = 1, 0
    same = np.array([sum(t.kind == s.kind for t in scene.shapes) - 1 for s in scene.shapes])
    side, many = rank[best], same[best]
    colour, kind = np.where(on, colour, 0), np.where(on, kind, IGNORE)
    side, many = np.where(on, side, IGNORE), np.where(on, many, IGNORE)
    assert cover.shape[1] == grid
    centre = torch.zeros(grid * grid)
    centre[centre_patches(scene, grid)] = 1.0
    flat = (torch.from_numpy(a.reshape(-1)) for a in (colour, kind))
    mass = torch.from_numpy(np.log(kind_mass(scene, cover) + MASS_FLOOR)).float().flatten(1).T
    return *flat, centre, torch.from_numpy(side.reshape(-1)), torch.from_numpy(many.reshape(-1)), mass


def object_mass(cover: np.ndarray) -> np.ndarray:
    """(n_shapes, grid, grid): each shape's coverage of every patch (``shapes.patch_coverage``) over
    its area in patches, so that every shape's patches sum to exactly 1 whichever patches it straddles."""
    return cover / cover.sum((1, 2), keepdims=True)


def kind_mass(scene: shapes.Scene, cover: np.ndarray) -> np.ndarray:
    """(len(KINDS), grid, grid): per kind, the object mass of that kind's shapes on every patch
    (``cover``: the scene's ``shapes.patch_coverage``); its sum over the patches is how many shapes of
    that kind the scene holds (0 where none)."""
    mass = object_mass(cover)
    out = np.zeros((len(shapes.KINDS), *mass.shape[1:]))
    for shape, m in zip(scene.shapes, mass):
        out[shapes.KINDS.index(shape.kind)] += m
    return out


class PatchHeads(nn.Module):
    """Dense supervised heads on the tower's layer -2 patch tokens (dropped after stage a)."""

    def __init__(self, hidden: int, grid: int, scene_weight: float = 0.0, mass_weight: float = 0.0):
        super().__init__()
        self.grid = grid
        self.scene_weight = scene_weight
        self.mass_weight = mass_weight
        if mass_weight > 0:  # only then: checkpoints of runs without it still resume
            # per kind, log object mass (a patch's share of each shape of that kind, over its area):
            # summed over patches it counts shapes, whichever patches they straddle
            self.mass = nn.Linear(hidden, len(shapes.KINDS))
        self.norm = nn.LayerNorm(hidden)  # the feature layer output is the raw residual stream
        self.colour = nn.Linear(hidden, 1 + len(shapes.COLORS))
        self.kind = nn.Linear(hidden, len(shapes.KINDS))
        self.column = nn.Linear(hidden, grid)
        self.row = nn.Linear(hidden, grid)
        # one patch per object says "an object is centred here": what counting needs
        self.centre = nn.Linear(hidden, 1)
        # scene facts on each shape's patches (what relation and count questions ask, kept local)
        self.side = nn.Linear(hidden, 3)
        self.many = nn.Linear(hidden, len(shapes.COUNTS) - 1)

    def loss(self, tower, pixels, colour, kind, centre, side, many, mass) -> dict:
        feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = self.norm(feats)
        n = feats.shape[1]
        column = torch.arange(n) % self.grid
        row = torch.arange(n) // self.grid
        colour_logits, kind_logits = self.colour(feats), self.kind(feats)
        # Shape patches are ~5% of all: weight them up so background does not dominate.
        weight = torch.where(colour > 0, 4.0, 1.0)
        colour_loss = F.cross_entropy(colour_logits.transpose(1, 2), colour, reduction="none")
        colour_loss = (colour_loss * weight).sum() / weight.sum()
        kind_loss = F.cross_entropy(kind_logits.transpose(1, 2), kind, ignore_index=IGNORE)
        pos_loss = F.cross_entropy(self.column(feats).transpose(1, 2), column.expand(len(feats), -1))
        pos_loss = pos_loss + F.cross_entropy(self.row(feats).transpose(1, 2), row.expand(len(feats), -1))
        centre_logits = self.centre(feats).squeeze(-1)
        centre_loss = F.binary_cross_entropy_with_logits(centre_logits, centre, pos_weight=torch.tensor(20.0))
        with torch.no_grad():
            on = colour > 0
            colour_acc = (colour_logits.argmax(-1)[on] == colour[on]).float().mean()
            kind_acc = (kind_logits.argmax(-1)[on] == kind[on]).float().mean()
            bg_acc = (colour_logits.argmax(-1)[~on] == 0).float().mean()
            # objects found: centre patches predicted (recall) and predictions that are centres
            hit = centre_logits > 0
            centre_recall = hit[centre > 0].float().mean()
            centre_precision = (centre[hit] > 0).float().mean() if hit.any() else torch.zeros(())
        total = colour_loss + kind_loss + 0.25 * pos_loss + 0.5 * centre_loss
        extra = {}
        if self.scene_weight > 0:
            side_logits, many_logits = self.side(feats), self.many(feats)
            side_loss = F.cross_entropy(side_logits.transpose(1, 2), side, ignore_index=IGNORE)
            many_loss = F.cross_entropy(many_logits.transpose(1, 2), many, ignore_index=IGNORE)
            total = total + self.scene_weight * (side_loss + many_loss)
            with torch.no_grad():
                extra["side_acc"] = (side_logits.argmax(-1)[on] == side[on]).float().mean()
                extra["many_acc"] = (many_logits.argmax(-1)[on] == many[on]).float().mean()
        if self.mass_weight > 0:
            predicted = self.mass(feats)
            # squared error in log space, weighted by the true mass (a relative error on the patches
            # that carry an object's count) plus a little on every patch (the floor elsewhere)
            true = mass.exp() - MASS_FLOOR
            weight = true + MASS_WEIGHT_FLOOR
            mass_loss = (weight * (predicted - mass) ** 2).sum() / weight.sum()
            total = total + self.mass_weight * mass_loss
            with torch.no_grad():  # per image and kind, the count read off the patches it covers
                read = ((predicted.exp() - MASS_FLOOR) * (true > 0)).sum(1)
                extra["mass_count_err"] = (read - true.sum(1)).abs().mean()
        return {
            **extra,
            "loss": total,
            "colour_acc": colour_acc,
            "kind_acc": kind_acc,
            "bg_acc": bg_acc,
            "centre_recall": centre_recall,
            "centre_precision": centre_precision,
        }


def vision_batch(processor, step: int, args, grid: int):
    scenes = shapes.make_scenes(
        "train", args.vision_batch, args.seed, step * args.vision_batch, args.photo_dir
    )
    targets = [patch_targets(s, grid) for s in scenes]
    pixels = pixels_of(processor, [shapes.render(s) for s in scenes])
    return pixels, *(torch.stack(column) for column in zip(*targets))


# ----------------------------------------------------------------------------------------- stage b
class Packer:
    """Packed sequences: the image prefix once per image, then all its questions (see module doc)."""

    def __init__(self, processor, type_weight: dict[str, float] | None = None):
        self.processor = processor
        self.type_weight = dict(TYPE_WEIGHT if type_weight is None else type_weight)
        tokenizer = processor.tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id = tokenizer.pad_token_id
        sample = shapes.render(shapes.make_scenes("test", 1)[0])
        text = build_prompt(processor, "what shape is the red object?")
        expanded = processor(images=[sample], text=[text])["input_ids"][0]
        cut = len(expanded) - expanded[::-1].index(self.image_id)
        self.prefix = expanded[:cut]  # "USER:" and one <image> per visual token

    def suffix(self, item: shapes.SceneItem) -> list[int]:
        """Token ids after the image of ``prompt answer</s>``; the last two are the targets."""
        tokenizer = self.processor.tokenizer
        ids = tokenizer(f"{build_prompt(self.processor, item.question)} {item.answer}</s>")["input_ids"]
        assert ids[-2:] == tokenizer(f"{item.answer}</s>")["input_ids"], item
        return ids[ids.index(self.image_id) + 1 :]

    def pack(self, per_image: list[list[shapes.SceneItem]]):
        """input_ids, 4-D bool mask, position ids, targets, loss weights, question index (per token)."""
        p = len(self.prefix)
        rows = []
        for items in per_image:
            ids, pos, owner, targets, weights = list(self.prefix), list(range(p)), [-1] * p, [], []
            for q, item in enumerate(items):
                suffix = self.suffix(item)
                ids += suffix
                pos += range(p, p + len(suffix))
                owner += [q] * len(suffix)
            targets = [IGNORE] * len(ids)
            weights = [0.0] * len(ids)
            question = [-1] * len(ids)
            end = p
            for q, item in enumerate(items):
                end += len(self.suffix(item))
                for t in (end - 3, end - 2):  # ":" predicts the answer, the answer predicts </s>
                    targets[t], weights[t], question[t] = ids[t + 1], self.type_weight[item.qtype], q
            rows.append((ids, pos, owner, targets, weights, question))
        length = max(len(r[0]) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id)
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        mask = torch.zeros((batch, 1, length, length), dtype=torch.bool)
        target = torch.full((batch, length), IGNORE)
        weight = torch.zeros((batch, length))
        question = torch.full((batch, length), -1)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for b, (ids, pos, owner, targets, weights, qs) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n], position_ids[b, :n] = torch.tensor(ids), torch.tensor(pos)
            target[b, :n], weight[b, :n], question[b, :n] = (
                torch.tensor(targets),
                torch.tensor(weights),
                torch.tensor(qs),
            )
            own = torch.tensor(owner)
            same = (own[:, None] == own[None, :]) | (own[None, :] == -1)  # own question or the prefix
            mask[b, 0, :n, :n] = causal[:n, :n] & same
            mask[b, 0, n:, n:] = torch.eye(length - n, dtype=torch.bool)  # padding sees itself only
        return input_ids, mask, position_ids, target, weight, question


def key_words(item: shapes.SceneItem) -> tuple[str, str]:
    """(the question word that looks up the image, the word whose state is probed for the answer).

    The look-up word names the evidence: the kind ("what color is the circle?"), the colour ("what
    shape is the blue object?", "is there a blue triangle?"; colours are unique in a scene), the
    counted kind, or the side ("... left of the circle": the only shape on that side is the leftmost
    or rightmost one). Presence is probed at its last word, where colour and kind are both known."""
    words = item.question.rstrip("?").split()
    key = {"color": -1, "shape": -2, "presence": -2, "count": 2, "relation": -4}[item.qtype]
    return words[key], words[-1] if item.qtype == "presence" else words[key]


def lm_batch(processor, packer: Packer, step: int, args):
    start = LM_OFFSET + step * args.lm_images
    scenes = shapes.make_scenes("train", args.lm_images, args.seed, start, args.photo_dir)
    per_image = [
        shapes.scene_questions(s, shapes.split_rng("train", args.seed + 7919, start + i), args.per_type)
        for i, s in enumerate(scenes)
    ]
    pixels = pixels_of(processor, [shapes.render(s) for s in scenes])
    grid = shapes.IMAGE_SIZE // shapes.PATCH_SIZE
    evidence = question_evidence(scenes, per_image, grid, args.count_look)
    return pixels, packer.pack(per_image), per_image, evidence


def question_evidence(scenes, per_image, grid: int, count_look: str = "centre") -> list:
    """Per question with evidence, ``(scene, question, share of every patch, share of the sink)``:
    where the look-up word should attend. The sink is the first token (where attention rests).

    Colour, shape, presence and relation questions put everything on the patches their objects
    cover (questions without objects are skipped). Counts depend on ``count_look``:
    - ``centre``: the centre patch of every counted object and the sink, equal weights, so the
      sink's share (1 / (n + 1)) says n, 0 included;
    - ``kind``: every patch of every counted object, as the other types (the tower writes how many
      shapes of its kind the scene holds onto each shape's patches, ``--scene-heads``); the sink
      only when nothing is counted;
    - ``mass``: every patch of every counted object in proportion to its object mass (coverage over
      the object's area: each object's patches add up to 1), and the sink 1, so the sink's share is
      1 / (n + 1) whichever patches the objects straddle (the tower writes the mass, ``--mass-weight``).
    """
    evidence = []
    for b, (scene, items) in enumerate(zip(scenes, per_image)):
        coverage = shapes.patch_coverage(scene)
        cover = torch.from_numpy(coverage).flatten(1).float()
        mass = torch.from_numpy(object_mass(coverage)).flatten(1).float()
        centres = centre_patches(scene, grid)
        for q, item in enumerate(items):
            where, sink = torch.zeros(cover.shape[1]), 0.0
            counting = item.qtype == "count"
            for i in item.objects:
                if counting and count_look == "centre":
                    where[centres[i]] += 1.0
                elif counting and count_look == "mass":
                    where += mass[i]
                else:
                    where += cover[i]
            if counting and (count_look != "kind" or not item.objects):
                sink = 1.0
            total = float(where.sum()) + sink
            if total > 0:
                evidence.append((b, q, where / total, sink / total))
    return evidence


def rebuilt_qk(model, hidden_states, layer: int, position_ids):
    """Queries (B, H, T, D) and keys (B, KV, T, D) of ``layer``, rebuilt from its input hidden
    state as the layer computes them (norm, projections, rotary); and the layer's scaling."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    text = model.config.text_config
    attn = lm.layers[layer].self_attn
    hidden = lm.layers[layer].input_layernorm(hidden_states[layer])
    batch, length, _ = hidden.shape
    q = attn.q_proj(hidden).view(batch, length, text.num_attention_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(batch, length, text.num_key_value_heads, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden, position_ids)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, attn.scaling


class Scaffold(nn.Module):
    """Training-only supervision of the two hops every answer takes (discarded afterwards; the
    model stays a stock LLaVA). From scratch, with answer loss alone, stage b sat at the answer
    prior: attention over 576 visual tokens starts uniform and the gradient that should sharpen it
    is tiny; supervising where the *answer* position looks (attempt 1) did not help within 270 steps.

    1. look (layer ``look_layer``, heads ``0..heads-1``): the question's look-up word attends to the
       evidence patches (cross-entropy over every token it sees, rebuilt from q and k; a count's
       target also puts one object's share on the first token, the sink, so its share says n);
    2. probe (a linear head on the input of layer ``probe_layer`` at the probed word) predicts the
       answer word: the looked-up attribute is there, decodable (as test-bed 1's match probe);
    3. route (layer ``route_layer``, heads ``0..heads-1``): the answer position attends to the probed
       word among all the tokens it sees; the answer loss then learns to read it out.
    """

    def __init__(self, model, processor, args):
        super().__init__()
        text = model.config.text_config
        layers = text.num_hidden_layers
        self.look_layer = args.look_layer
        self.probe_layer = layers // 4 if args.probe_layer is None else args.probe_layer
        self.route_layer = layers * 3 // 8 if args.route_layer is None else args.route_layer
        self.heads = args.scaffold_heads
        self.norm = nn.LayerNorm(text.hidden_size)
        self.probe = nn.Linear(text.hidden_size, text.vocab_size)
        if getattr(args, "word_weight", 0) > 0:  # only then: checkpoints of runs without it still load
            self.word_norm = nn.LayerNorm(text.hidden_size)
            self.word = nn.Linear(text.hidden_size, text.vocab_size)
        self.tokenizer = processor.tokenizer

    def anchors(self, packer, per_image) -> list[tuple[int, int, int, int, int, int]]:
        """Per question: (row, question, look-up word, probed word, answer position, answer id)."""
        found, p = [], len(packer.prefix)
        for b, items in enumerate(per_image):
            end = p
            for q, item in enumerate(items):
                suffix = packer.suffix(item)
                begin, end = end, end + len(suffix)
                key, probed = (self.tokenizer.convert_tokens_to_ids(w) for w in key_words(item))
                body = suffix[:-2]  # the question without its answer and </s>
                look = begin + len(body) - 1 - body[::-1].index(key)
                probe = begin + len(body) - 1 - body[::-1].index(probed)
                found.append((b, q, look, probe, end - 3, suffix[-2]))
        return found

    def losses(self, model, hidden_states, packed, anchors, evidence, image_id) -> dict:
        input_ids, mask, position_ids, _, _, _ = packed
        heads = torch.arange(self.heads)
        ratio = model.config.text_config.num_attention_heads // model.config.text_config.num_key_value_heads
        where = {(b, q): a for b, q, *a in anchors}
        out = {}
        # 1. look: the look-up word over every token it sees (the softmax the layer computes: a
        # target over the visual tokens alone would be met with the mass parked on the sink)
        q, k, scale = rebuilt_qk(model, hidden_states, self.look_layer, position_ids)
        visual = (input_ids[0] == image_id).nonzero()[:, 0]
        rows = torch.tensor([e[0] for e in evidence])
        at = torch.tensor([where[(e[0], e[1])][0] for e in evidence])
        queries = q[rows[:, None], heads[None], at[:, None]]  # (N, heads, D)
        keys = k[rows][:, heads // ratio]  # (N, heads, T, D)
        logits = (queries[:, :, None] * keys).sum(-1) * scale
        visible = mask[rows, 0, at]  # (N, T)
        logits = logits.masked_fill(~visible[:, None], torch.finfo(logits.dtype).min)
        goal = torch.zeros(len(evidence), logits.shape[-1])
        goal[:, visual] = torch.stack([e[2] for e in evidence])
        goal[:, 0] = torch.tensor([e[3] for e in evidence])
        goal = goal[:, None]
        out["look"] = -(goal * logits.log_softmax(-1).clamp_min(-1e4)).sum(-1).mean()
        with torch.no_grad():  # attention mass where the target puts it (heads averaged)
            out["look_mass"] = (logits.softmax(-1) * (goal > 0)).sum(-1).mean()
        # 2. probe: the answer word from the probed word's state
        rows = torch.tensor([a[0] for a in anchors])
        probed = torch.tensor([a[3] for a in anchors])
        answer_ids = torch.tensor([a[5] for a in anchors])
        state = self.norm(hidden_states[self.probe_layer][rows, probed])
        probe_logits = self.probe(state)
        out["probe"] = F.cross_entropy(probe_logits, answer_ids)
        out["probe_acc"] = (probe_logits.argmax(-1) == answer_ids).float().mean().detach()
        if hasattr(self, "word"):  # 2b. word: the look-up word is still itself where it looks up
            looked = torch.tensor([a[2] for a in anchors])
            word_logits = self.word(self.word_norm(hidden_states[self.look_layer][rows, looked]))
            out["word"] = F.cross_entropy(word_logits, input_ids[rows, looked])
            out["word_acc"] = (word_logits.argmax(-1) == input_ids[rows, looked]).float().mean().detach()
        # 3. route: the answer position over everything it sees
        q, k, scale = rebuilt_qk(model, hidden_states, self.route_layer, position_ids)
        answer_at = torch.tensor([a[4] for a in anchors])
        queries = q[rows[:, None], heads[None], answer_at[:, None]]  # (N, heads, D)
        keys = k[rows][:, heads // ratio]  # (N, heads, T, D)
        logits = (queries[:, :, None] * keys).sum(-1) * scale
        visible = mask[rows, 0, answer_at]  # (N, T)
        logits = logits.masked_fill(~visible[:, None], torch.finfo(logits.dtype).min)
        goal = probed[:, None].expand(-1, len(heads))
        out["route"] = F.cross_entropy(logits.flatten(0, 1), goal.flatten())
        return out


def lm_loss(model, pixels, packed, scaffold=None, anchors=None, evidence=None, image_id=None):
    input_ids, mask, position_ids, target, weight, question = packed
    out = model(
        input_ids=input_ids,
        pixel_values=pixels,
        attention_mask=mask,
        position_ids=position_ids,
        output_hidden_states=scaffold is not None,
    )
    logits = out.logits
    token_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    loss = (token_loss * weight).sum() / weight.sum()
    extra = {}
    if scaffold is not None:
        extra = scaffold.losses(model, out.hidden_states, packed, anchors, evidence, image_id)
    with torch.no_grad():  # a question is right when both of its target tokens are
        hit = logits.argmax(-1) == target
        correct = []
        for b in range(len(input_ids)):
            for q in range(int(question[b].max()) + 1):
                correct.append(bool(hit[b][question[b] == q].all()))
    return loss, extra, correct


# ----------------------------------------------------------------------------------------- loop
class StopTraining(Exception):
    """``--stop-after`` steps are done in this invocation (the checkpoint is written)."""


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


def train_stage(name, model, groups, modules, step_fn, total, args, ckpt, state):
    """A generic resumable AdamW + cosine loop over parameter ``groups`` (each with its lr);
    ``step_fn(step)`` returns (loss, metrics dict)."""
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    params = [p for group in groups for p in group["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, args.warmup))
    start = 0
    if state.get("stage") == name:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        for key, module in modules.items():
            module.load_state_dict(state[key])
        start = state["step"]
        log(f"{name}: resuming at step {start}")
    elapsed = state.get("timings", {}).get(f"{name}_s", 0.0) if state.get("stage") == name else 0.0
    began = time.perf_counter()
    for step in range(start, total):
        if args.stop_after is not None and args.steps_run >= args.stop_after:
            raise StopTraining
        args.steps_run += 1
        loss, metrics = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == total - 1:
            text = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            log(f"{name} step {step}/{total}: loss {loss.item():.4f} {text}")
        last = step == total - 1 or (args.stop_after is not None and args.steps_run >= args.stop_after)
        if (step + 1) % args.checkpoint_every == 0 or last:
            timings = {**state.get("timings", {}), f"{name}_s": elapsed + time.perf_counter() - began}
            state.update(
                stage=name, step=step + 1, opt=opt.state_dict(), sched=sched.state_dict(), timings=timings
            )
            state.update({key: module.state_dict() for key, module in modules.items()})
            save_checkpoint(ckpt, state)
    return elapsed + time.perf_counter() - began


def type_weights(args) -> dict[str, float]:
    """TYPE_WEIGHT with the command line's count and relation weights."""
    return {**TYPE_WEIGHT, "count": args.count_weight, "relation": args.relation_weight}


def train(model, processor, args, ckpt: Path) -> dict:
    state = torch.load(ckpt, weights_only=False) if args.resume and ckpt.exists() else {}
    tower = model.model.vision_tower
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    heads = PatchHeads(tower.config.hidden_size, grid, args.scene_heads, args.mass_weight)
    timings = dict(state.get("timings", {}))
    # from --init-from, the vision stage runs only --refine-vision steps (fresh heads)
    vision_steps = args.vision_steps if args.init_from is None else args.refine_vision
    done_vision = state.get("stage") == "lm" or (
        state.get("stage") == "vision" and state["step"] >= vision_steps
    )
    done_vision = done_vision or vision_steps == 0
    if done_vision and state.get("stage") == "vision":
        model.load_state_dict(state["model"])

    if not done_vision:
        tower.train()

        def vision_step(step):
            out = heads.loss(tower, *vision_batch(processor, step, args, grid))
            return out.pop("loss"), {k: v.item() for k, v in out.items()}

        groups = [{"params": list(tower.parameters()) + list(heads.parameters()), "lr": args.vision_lr}]
        modules = {"model": model, "heads": heads}
        timings["vision_s"] = train_stage(
            "vision", model, groups, modules, vision_step, vision_steps, args, ckpt, state
        )
    state["timings"] = timings

    model.train()
    tower.train(args.tower_lr_scale > 0)
    tower.requires_grad_(args.tower_lr_scale > 0)
    packer = Packer(processor, type_weights(args))
    scaffold = Scaffold(model, processor, args)
    weights = {"look": args.look_weight, "probe": args.probe_weight, "route": args.route_weight}
    weights["word"] = args.word_weight
    use_scaffold = any(w > 0 for w in weights.values())

    def lm_step(step):
        pixels, packed, per_image, evidence = lm_batch(processor, packer, step, args)
        anchors = scaffold.anchors(packer, per_image) if use_scaffold else None
        loss, extra, correct = lm_loss(
            model, pixels, packed, scaffold if use_scaffold else None, anchors, evidence, packer.image_id
        )
        qtypes = [it.qtype for items in per_image for it in items]
        metrics = {"answer_loss": loss.item(), **{k: v.item() for k, v in extra.items()}}
        metrics["acc"] = float(np.mean(correct))
        loss = loss + sum(weights[k] * v for k, v in extra.items() if k in weights)
        for qtype in shapes.QTYPES:
            marks = [c for c, t in zip(correct, qtypes) if t == qtype]
            if marks:
                metrics[qtype] = float(np.mean(marks))
        return loss, metrics

    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    groups = [{"params": rest + list(scaffold.parameters()), "lr": args.lm_lr}]
    if args.tower_lr_scale > 0:  # the answers' gradient also refines the tower, at a lower rate
        groups.append({"params": list(tower.parameters()), "lr": args.lm_lr * args.tower_lr_scale})
    modules = {"model": model, "scaffold": scaffold}
    timings["lm_s"] = train_stage("lm", model, groups, modules, lm_step, args.lm_steps, args, ckpt, state)
    tower.requires_grad_(True)
    model.eval()
    return timings


# ----------------------------------------------------------------------------------------- eval/card
def evaluate(model, processor, items, mode: str = "scene", batch_size: int = 50) -> dict:
    batches = item_batches(items, batch_size)
    if mode != "scene":  # same questions, image replaced by the background photo or uniform gray
        images = [shapes.render(it.scene, mode) for it in items]
        batches = [
            (images[i : i + batch_size], qs) for i, (_, qs) in zip(range(0, len(items), batch_size), batches)
        ]
    texts = answer(model, processor, batches).texts
    return accuracy_summary(items, score(items, texts))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def table(metrics: dict[str, dict], key: str, order) -> str:
    names = list(metrics)
    head = "| " + " | ".join([key, *names, "n"]) + " |\n|" + "---|" * (len(names) + 2) + "\n"
    first = metrics[names[0]]
    rows = ["| all | " + " | ".join(f"{metrics[m]['accuracy']:.1%}" for m in names) + f" | {first['n']} |"]
    for group in order:
        if group in first.get(key, {}):
            cells = [f"{metrics[m][key].get(group, {}).get('accuracy', float('nan')):.1%}" for m in names]
            rows.append(f"| {group} | " + " | ".join(cells) + f" | {first[key][group]['n']} |")
    return head + "\n".join(rows)


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
        columns = {k: metrics[k] for k in ("unpruned", "background", "blank", "prior")}
        results = (
            f"Greedy generation (`max_new_tokens=2`), exact match of the first word, on the test split "
            f"({metrics['unpruned']['n']} questions on {args.eval_scenes} scenes; photos and random stream "
            "never used in training). `background`: the same questions on the scene's photo without the "
            "shapes; `blank`: a uniform gray image; `prior`: always the most frequent answer of the type.\n\n"
            f"{table(columns, 'by_type', shapes.QTYPES)}\n\n"
            "Accuracy against the size of the object the answer depends on (area in 14-px patches; "
            "questions without such an object, e.g. a count of 0, are left out):\n\n"
            f"{table({'unpruned': metrics['unpruned']}, 'by_size', shapes.size_bins())}\n"
        )
    else:
        results = "Not evaluated (run without `--no-eval`).\n"
    vision_min, lm_min = timings.get("vision_s", 0) / 60, timings.get("lm_s", 0) / 60
    count_target = {
        "centre": "a count's target is the counted objects' centre patches and the first token with equal"
        " weights",
        "kind": "a count's target is every patch of the counted objects, as the other types (it reads the"
        " tower's same-kind count), and the first token when nothing is counted",
        "mass": "a count's target is every patch of the counted objects in proportion to its object mass"
        " (coverage over the object's area, so each object adds up to 1) and the first token 1: its"
        " share is 1/(n+1)",
    }[args.count_look]
    word_probe = (
        f"; a linear probe on the look-up word's state at the input of layer {args.look_layer} predicts"
        f" that word (weight {args.word_weight}: 'left' and 'right' stay apart)"
        if args.word_weight > 0
        else ""
    )
    continued = ""
    if args.init_from is not None:
        continued = (
            f"This run started from the weights of `{args.init_from}` (a test-bed 2 this script trained; "
            "its card gives the recipe and time of its stages): "
            + (
                f"stage 1 ran {args.refine_vision} more steps on the loaded tower with fresh heads"
                if args.refine_vision
                else "stage 1 did not run again"
            )
            + f", and stage 2 ran {args.lm_steps} more steps with a fresh optimiser, schedule and scaffold. "
            "The times below are this run's alone.\n"
        )
    vision_steps = args.vision_steps if args.init_from is None else args.refine_vision
    scene_heads = ""
    if args.scene_heads > 0:
        scene_heads = (
            "; on shape patches two scene facts, written onto the shape's own patches so that they stay "
            "local: the shape's side rank (leftmost / rightmost / between, by box centre: the only "
            "shape left of X is the leftmost one) and how many shapes of its kind the scene holds "
            f"(weight {args.scene_heads} each)"
        )
    if args.mass_weight > 0:
        scene_heads += (
            "; per kind, the log of the patch's object mass (its coverage by each shape of that kind over "
            f"that shape's area, plus {MASS_FLOOR:g}; mean squared error, weight {args.mass_weight}): summed "
            "over the patches it counts the kind's shapes"
        )
    card = f"""# vistrim test-bed 2: small shapes on photos at LLaVA-1.5 geometry

A small **stock `LlavaForConditionalGeneration`** with LLaVA-1.5's visual-token geometry (**{n_visual}
visual tokens**, {t.num_hidden_layers} decoder layers), trained so that answers depend on small
regions: several small shapes on natural photographs. It exists to rank visual-token pruning
methods: which tokens a method keeps decides whether the answer survives.
Load with `vistrim.models.load_model("testbed2")` or `LlavaForConditionalGeneration.from_pretrained(path)`
+ `AutoProcessor.from_pretrained(path)`.

## Architecture

- Vision: CLIP vision tower, {v.image_size}x{v.image_size} images, patch {v.patch_size} -> {n_visual} patch
  tokens + CLS, hidden {v.hidden_size}, MLP {v.intermediate_size}, {v.num_hidden_layers} layers,
  {v.num_attention_heads} heads. LLaVA reads layer {cfg.vision_feature_layer} with the
  `{cfg.vision_feature_select_strategy}` strategy (CLS dropped).
- Projector: Linear-GELU-Linear, {v.hidden_size} -> {t.hidden_size}.
- Language model: Llama, hidden {t.hidden_size}, MLP {t.intermediate_size}, {t.num_hidden_layers} layers,
  {t.num_attention_heads} query heads / {t.num_key_value_heads} key-value heads (GQA), vocabulary
  {t.vocab_size} (word-level tokenizer over the prompt, question and answer words).
- Prompt: `USER: <image>\\n{{question}} ASSISTANT:`; the answer is one word followed by `</s>`.
- Rotary base (rope_theta): {t.rope_parameters["rope_theta"]:g}.

| part | parameters |
|---|---|
{params}
| total | {count(model):,} |

Weights: fp32 safetensors.

## Data (`vistrim.data.shapes`)

Each scene: a random square crop (40-100% of the short side) of a photo, resized to 336 px,
mirrored with p=0.5, colour-jittered (brightness/contrast 0.6-1.4, saturation 0.5-1.5, hue +-20/256);
3-5 flat shapes (circle/square/triangle; red, green, blue, yellow, purple, white, each colour at
most once; box side 28-60 px = 2-4.3 patches; 2-px dark outline; >= 6 px apart). Questions:
`color` (what color is the circle?), `shape` (what shape is the blue object?), `presence`
(is there a blue triangle? half no, naming a present colour on another present kind), `count`
(how many triangles are there? 0-3, answers spread out), `relation` (what color is the shape
left of the circle? only when exactly one shape is on that side and every other shape is at least
a patch away horizontally). Train photos: scikit-image ({", ".join(shapes.TRAIN_PHOTOS[:-1])}) and
scikit-learn (china). Test photos (shipped in `vistrim/assets/photos/`, never used in training):
{", ".join(shapes.TEST_PHOTOS)} (scikit-image, scikit-learn and matplotlib sample images), with a
separate random stream.

## Training recipe (`scripts/train_testbed2.py`)

{continued}
1. Vision tower alone ({vision_steps} steps, batch {args.vision_batch}, AdamW lr {args.vision_lr},
   cosine, {args.warmup} warm-up steps): dense heads on the layer -2 patch tokens: colour of the shape
   covering the patch or background (shape patches weighted 4x), kind of shape on shape patches, the
   patch's column and row (weight 0.25), and whether the patch holds a shape's centre (weight 0.5,
   one patch per object, for counting){scene_heads}. Heads discarded afterwards.
2. Projector + language model ({args.lm_steps} steps of {args.lm_images} fresh scenes with up to
   {args.per_type} questions of every type each, AdamW lr {args.lm_lr}, cosine; vision tower at
   {args.tower_lr_scale} x that lr, 0 = frozen):
   cross-entropy on the answer word and `</s>`, question types weighted {type_weights(args)} (colour and
   relation questions are rarer). All questions of a scene share one packed sequence (image prefix
   once; 4-D mask and explicit positions make it the same computation as separate sequences).
   A training-only scaffold (discarded) supervises the two hops of every answer: the question's
   look-up word (the named kind, colour or side) attends to the evidence patches in heads
   0-{args.scaffold_heads - 1} of layer {args.look_layer} (weight {args.look_weight}; over every token
   the word sees; {count_target}); a linear probe
   on the probed word's state predicts the answer (weight {args.probe_weight}); the answer position
   attends to that word in heads 0-{args.scaffold_heads - 1} of a middle layer (weight
   {args.route_weight}){word_probe}.

- Seed: {args.seed}; command: `{timings.get("command", "")}`
- Training wall time: {vision_min:.1f} min (stage 1) + {lm_min:.1f} min (stage 2)
  = {vision_min + lm_min:.1f} min
- Hardware: {cpu_name()}, {torch.get_num_threads()} torch thread(s) (CPU only, cores shared with other work),
  torch {torch.__version__}

## Results

{results}"""
    (out / "MODEL_CARD.md").write_text(card)


# ----------------------------------------------------------------------------------------- main
def init_from(model, folder: Path) -> None:
    """Load a saved test-bed 2's weights into ``model``; its architecture must be the same."""
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
    mine = model.state_dict()
    if saved.keys() != mine.keys() or any(saved[k].shape != mine[k].shape for k in mine):
        raise SystemExit(f"--init-from {folder}: not the architecture this run builds (see --tiny)")
    model.load_state_dict(saved)
    log(f"initialised from {folder}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (model, processor, card)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny widths for smoke tests (not a useful model)")
    p.add_argument("--photo-dir", help="train on the JPEGs in this folder instead of the sample photos")
    p.add_argument("--vision-steps", type=int, default=350)
    p.add_argument("--vision-batch", type=int, default=24)
    p.add_argument("--vision-lr", type=float, default=1e-3)
    p.add_argument("--lm-steps", type=int, default=1800)
    p.add_argument("--lm-images", type=int, default=8, help="scenes per step (with all their questions)")
    p.add_argument("--lm-lr", type=float, default=8e-4)
    p.add_argument("--per-type", type=int, default=2, help="questions of each type per scene")
    p.add_argument("--count-weight", type=float, default=TYPE_WEIGHT["count"], help="count answer weight")
    p.add_argument("--relation-weight", type=float, default=TYPE_WEIGHT["relation"], help="relation weight")
    p.add_argument("--look-weight", type=float, default=1.0, help="look-up attention loss weight (0: off)")
    p.add_argument("--look-layer", type=int, default=0, help="layer whose look-up attention is supervised")
    p.add_argument("--probe-weight", type=float, default=1.0, help="answer-probe loss weight (0: off)")
    p.add_argument("--probe-layer", type=int, help="layer whose input is probed (default: L/4)")
    p.add_argument(
        "--word-weight",
        type=float,
        default=0.0,
        help="look-up word probe loss weight: a linear head on the input of the look-up layer at the "
        "look-up word predicts that word, so that e.g. 'left' and 'right' stay apart (0: off)",
    )
    p.add_argument(
        "--count-look",
        choices=("centre", "kind", "mass"),
        default="centre",
        help="where a count's look-up word attends: the counted objects' centre patches and the sink in "
        "equal shares (centre); all their patches, the sink only for none (kind: it reads the tower's "
        "same-kind count); or all their patches in proportion to object mass, each object 1, and the sink "
        "1 (mass: the sink's share is 1/(n+1) whichever patches an object straddles; use --mass-weight)",
    )
    p.add_argument(
        "--mass-weight",
        type=float,
        default=0.0,
        help="stage a: weight of the per-patch, per-kind log object mass head (coverage over the "
        "object's area; summed over patches it counts each kind), what --count-look mass reads (0: off)",
    )
    p.add_argument("--route-weight", type=float, default=1.0, help="answer-routing loss weight (0: off)")
    p.add_argument("--route-layer", type=int, help="layer whose routing is supervised (default: 3L/8)")
    p.add_argument("--scaffold-heads", type=int, default=2, help="query heads supervised (the first N)")
    p.add_argument("--tower-lr-scale", type=float, default=0.2, help="stage b tower lr / lm lr (0: frozen)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if present")
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from this saved test-bed 2 folder's weights (e.g. the shipped one): the vision stage "
        "runs --refine-vision steps (default 0: skipped) and stage 2 runs --lm-steps more steps with a fresh "
        "optimiser, schedule and scaffold",
    )
    p.add_argument("--refine-vision", type=int, default=0, help="with --init-from: vision-stage steps first")
    p.add_argument(
        "--scene-heads",
        type=float,
        default=0.0,
        help="stage a: weight of the per-shape-patch side rank (leftmost/rightmost/between) and same-kind "
        "count heads (0: off)",
    )
    p.add_argument("--stop-after", type=int, help="stop after N steps of this run (then --resume)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the 2 cores are shared)")
    p.add_argument("--eval-scenes", type=int, default=300, help="test scenes for the model card")
    p.add_argument("--no-eval", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = build_testbed2(args.seed, TINY2_SIZE if args.tiny else Testbed2Size())
    if args.init_from is not None:
        init_from(model, args.init_from)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.pt"
    log(f"model: {count(model):,} parameters; checkpoint {ckpt}")
    args.steps_run = 0
    try:
        timings = train(model, processor, args, ckpt)
    except StopTraining:
        log(f"stopped after {args.steps_run} steps; continue with --resume")
        return {"stopped": True}
    timings["command"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    log(f"training took {timings.get('vision_s', 0):.0f}s + {timings['lm_s']:.0f}s")
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)

    metrics = None
    if not args.no_eval:
        items = shapes.eval_items(args.eval_scenes, args.seed)
        metrics = {mode: evaluate(model, processor, items, mode) for mode in ("scene", "background", "blank")}
        metrics["unpruned"] = metrics.pop("scene")
        metrics["prior"] = shapes.answer_prior(items)
        (args.out / "metrics.json").write_text(json.dumps({"metrics": metrics, "timings": timings}, indent=1))
        log(
            json.dumps(
                {
                    k: (m["accuracy"], {t: v["accuracy"] for t, v in m["by_type"].items()})
                    for k, m in metrics.items()
                }
            )
        )
    write_card(args.out, model, args, timings, metrics)
    return {"timings": timings, "metrics": metrics}


if __name__ == "__main__":
    main()
