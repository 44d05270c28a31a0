"""A token reducer inside the vision tower, and an importance probe, for vision-stage methods.

Vision-stage methods (MustDrop) shorten the token sequence *inside* the tower, so the layers after
the reduction run on fewer tokens. ``VisionStage`` installs, for the lifetime of a session:
a forward hook that reduces the output of one tower layer; mask pre-hooks on the later layers
(images that keep different numbers of tokens are padded at the end and the padding is masked
with transformers' own mask builder); optionally an importance probe at one layer, rebuilt from
that layer's captured q and k projections (the tower keeps its attention backend): the CLS row of
attention for towers with a CLS token, and for CLS-free towers (SigLIP) the attention each patch
receives, averaged over every query and head; and a hook on the
projector that pads every image back to its N placeholder rows, so that ``generate`` (which
encodes images before prefill and copies them per beam) sees the shapes it expects.

What is real in those rows is recorded per projector output and found again at prefill from the
feature tensors' storage, whoever called the encoder and however ``generate`` copied the list.

Tile families (LLaVA-NeXT, OneVision: the core packs the tiles after the projector, unpadded, with
newline rows) pad back *spatially* (``VisionTower.spatial``): every tile gets its P patch rows back,
each patch holding the value of the token it merged into, so the core's own packing runs on a
coherent grid. The family wraps its image encoder (``VisionTower.wrap_encoder``): the stage acts
only inside that call (video frames through the same tower are left alone), and the family maps
the packed rows back to (tile, patch) with an index probe run through the core's packing;
``packed_rows`` then keeps one placeholder per merged token and records it by the packed tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# (hidden (I, 1 + P, D), which sequences may merge (I,) bool or None = all, visual tokens of each
# sequence's image (I,) or None = P) -> (reduced hidden, valid, merged count per image, token of
# each patch or None)
Reducer = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
]


@dataclass
class VisionRecord:
    """One encoder run: valid (I, M) real patch tokens (real first); cls (I, M) importance of each
    patch at the probe layer (head-averaged CLS attention, or mean attention received) or None;
    tokens_per_layer (CLS included, mean over images);
    merged (I,) merged windows per image; patch_token (I, P) the reduced token each patch went into.

    Packed records (tile families, one per image as the core packed it): ``valid`` (1, L) marks the
    packed rows that carry one token each into the language model (the first row of each merged
    token; the other rows of a token leave before the first decoder layer), ``protected`` (1, L)
    the rows that are not patches (newlines), kept like text; ``cls`` (1, L) is the importance of
    each row's token as the core's packing places it; ``row_token`` (1, L) which merged token each
    row shows (``packed_rows``)."""

    valid: torch.Tensor
    cls: torch.Tensor | None
    tokens_per_layer: list[float]
    merged: torch.Tensor | None
    rows: int  # N: rows per image after padding back
    patch_token: torch.Tensor | None = None
    protected: torch.Tensor | None = None
    row_token: torch.Tensor | None = None


class VisionStage:
    def __init__(
        self,
        tower,
        *,
        reduce_after: int | None,
        reducer: Reducer | None,
        probe_layer: int | None,
        full_matrix: bool = False,
    ) -> None:
        self.tower = tower  # families.VisionTower
        self.reduce_after, self.reducer = reduce_after, reducer
        self.probe_layer, self.full_matrix = probe_layer, full_matrix
        self.records: OrderedDict[int, VisionRecord] = OrderedDict()
        self._run: dict = {}
        # Families that wrap their image encoder arm the stage only inside that call.
        self.armed = tower.wrap_encoder is None
        self.allowed: torch.Tensor | None = None  # (I,) sequences of the next run that may merge
        self.counted: torch.Tensor | None = None  # (I,) visual tokens of each sequence's image
        self.last: VisionRecord | None = None  # the latest run's record (per sequence, spatial)

    @contextmanager
    def encoding(self, allowed: torch.Tensor | None = None, counted: torch.Tensor | None = None):
        """Arm the stage for the tower runs inside the block; ``allowed`` (I,) bool: which of the
        sequences of those runs may merge (None: all); ``counted`` (I,): the visual tokens the
        image of each sequence has in the prompt (what a budget counts; None: the sequence's P)."""
        self.armed, self.allowed, self.counted, self.last = True, allowed, counted, None
        try:
            yield
        finally:
            self.armed, self.allowed, self.counted = self.tower.wrap_encoder is None, None, None

    def remember(self, features: list[torch.Tensor], records: list[VisionRecord]) -> None:
        """Record ``records[i]`` for the feature tensor ``features[i]`` (found again by ``lookup``)."""
        for feature, record in zip(features, records):
            self.records[feature.untyped_storage().data_ptr()] = record
        # a few recent runs are enough; older storage may be reused
        while len(self.records) > max(8, 2 * len(records)):
            self.records.popitem(last=False)

    def install(self, session) -> None:
        tower, layers = self.tower, self.tower.layers
        session.add_handle(tower.module.register_forward_pre_hook(self._start))
        if self.reducer is not None:
            session.add_handle(layers[self.reduce_after].register_forward_hook(self._reduce))
            for layer in layers[self.reduce_after + 1 :]:
                session.add_handle(layer.register_forward_pre_hook(self._mask, with_kwargs=True))
        if self.probe_layer is not None:
            q_proj, k_proj, *_ = tower.attention(self.probe_layer)
            session.add_handle(q_proj.register_forward_hook(self._capture("q")))
            session.add_handle(k_proj.register_forward_hook(self._capture("k")))
            session.add_handle(layers[self.probe_layer].register_forward_hook(self._importance))
        session.add_handle(tower.projector.register_forward_hook(self._pad_back))
        if tower.wrap_encoder is not None:
            tower.wrap_encoder(session, self)

    def lookup(self, features: list[torch.Tensor]) -> list[tuple[VisionRecord, int]] | None:
        """For each per-image feature tensor, the record of the run that made it and the image's
        index in that run; None if any image was encoded outside this stage."""
        found = []
        for feature in features:
            record = self.records.get(feature.untyped_storage().data_ptr())
            if record is None or feature.shape[0] != record.rows:
                return None
            found.append((record, feature.storage_offset() // feature[0].numel() // record.rows))
        return found

    # ------------------------------------------------------------------ hooks
    def _start(self, module, args):
        self._run = {"valid": None, "cls": None, "merged": None, "before": None, "patch_token": None}
        if not self.armed:
            self._run = {}

    def _reduce(self, module, args, output):
        if not self.armed:
            return None
        self._run["before"] = output.shape[1]
        allowed = None if self.allowed is None else self.allowed.to(output.device)
        hidden, self._run["valid"], self._run["merged"], self._run["patch_token"] = self.reducer(
            output, allowed, self.counted
        )
        return hidden

    def _mask(self, module, args, kwargs):
        valid = self._run.get("valid")
        if not self.armed or valid is None or bool(valid.all()):
            return None
        hidden = args[0]
        return (hidden, self.tower.padding_mask(hidden, valid), *args[2:]), kwargs

    def _capture(self, name: str):
        def hook(module, args, output):
            if self.armed:
                self._run[name] = output

        return hook

    def _importance(self, module, args, output):
        if not self.armed:
            return
        _, _, heads, head_dim, scale = self.tower.attention(self.probe_layer)
        batch, length, _ = self._run["q"].shape
        q, k = (self._run[n].view(batch, length, heads, head_dim).transpose(1, 2).float() for n in "qk")
        cls = self.tower.prefix > 0
        # The released code materialises every row; with a CLS token only its row is needed.
        queries = q if self.full_matrix or not cls else q[:, :, :1]
        logits = queries @ k.transpose(-1, -2) * scale
        valid = self._run.get("valid")
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if cls:
            self._run["cls"] = probs[:, :, 0].mean(1)
        else:  # CLS-free tower: attention each token receives, averaged over real queries and heads
            weight = torch.ones(batch, length) if valid is None else valid.float()
            received = (probs * weight.to(probs.device)[:, None, :, None]).sum(2).mean(1)
            self._run["cls"] = received / weight.sum(-1, keepdim=True).to(received.device)
        self._run["q"] = self._run["k"] = None

    def _pad_back(self, module, args, output):
        if not self.armed:
            return None
        tower, run, count = self.tower, self._run, output.shape[0]
        rows, prefix = tower.rows, tower.prefix
        valid = (
            run["valid"][:, prefix:]
            if run.get("valid") is not None
            else torch.ones(output.shape[:2], dtype=torch.bool)
        )
        valid = valid.to(output.device)
        if tower.spatial:
            return self._pad_back_spatially(output, valid)
        if output.shape[1] < rows:
            output = torch.cat([output, output.new_zeros(count, rows - output.shape[1], output.shape[2])], 1)
            valid = torch.cat([valid, valid.new_zeros(count, rows - valid.shape[1])], 1)
        cls = run.get("cls")
        if cls is not None:
            cls = torch.cat([cls[:, prefix:], cls.new_zeros(count, rows + prefix - cls.shape[1])], 1)
            cls = cls.masked_fill(~valid, 0)
        per_layer = self._tokens_per_layer(float(valid.sum(-1).double().mean()) + prefix)
        self.last = VisionRecord(valid, cls, per_layer, run.get("merged"), rows, run.get("patch_token"))
        self.remember([output], [self.last])
        return output

    def _tokens_per_layer(self, after: float) -> list[float]:
        layers, before = len(self.tower.layers), self._run.get("before")
        if before is None:
            return [after] * layers
        return [float(before)] * (self.reduce_after + 1) + [after] * (layers - self.reduce_after - 1)

    def _pad_back_spatially(self, output: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Every sequence back to its P patch rows, each patch holding its token's row (the same
        tensor when nothing was reduced); ``last`` records the run per patch."""
        run, prefix = self._run, self.tower.prefix
        patch_token = run.get("patch_token")
        after = float(valid.sum(-1).double().mean()) + prefix
        cls = run.get("cls")
        if cls is not None:
            cls = cls[:, prefix:].masked_fill(~valid, 0)
        if patch_token is not None:
            patch_token = patch_token.to(output.device)
            output = output.gather(1, patch_token[..., None].expand(-1, -1, output.shape[-1]))
            if cls is not None:
                cls = cls.gather(1, patch_token.to(cls.device))
        rows = output.shape[1]
        self.last = VisionRecord(
            torch.ones(output.shape[:2], dtype=torch.bool, device=output.device),
            cls,
            self._tokens_per_layer(after),
            run.get("merged"),
            rows,
            patch_token,
        )
        return output


def packed_rows(
    ids: torch.Tensor, patch_token: torch.Tensor | None, mergeable: torch.Tensor, patches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which packed rows of one image carry a token into the language model.

    ids: (L, 2) float64, the core's packing run on an index probe: channel 0 holds 1 + t * P + p
    for patch p of sequence t of the run (0 for newline rows), channel 1 its square, so a row is an
    exact copy of one patch iff channel 1 equals channel 0 squared (a blend of distinct patches has
    a positive variance there). patch_token: (T, P) the run's token of each patch (None: nothing
    merged); mergeable: (T,) the sequences that may have merged. Rows copied from a mergeable
    sequence keep, per (sequence, token), only the first row (packed order) showing it; rows from
    other sequences (e.g. interpolated ones) are each their own token.
    Returns (valid (L,), protected (L,), token (L,)): token rows, newline rows, and the token each
    row shows (rows with equal values are copies of one merged token; -1 for newlines, a distinct
    negative value for every row that is its own token).
    """
    value = ids[:, 0]
    newline = value == 0
    exact = exact_rows(ids)
    index = (value.round().long() - 1).clamp(min=0, max=mergeable.numel() * patches - 1)
    tile, patch = index // patches, index % patches
    token = patch if patch_token is None else patch_token.to(ids.device)[tile, patch]
    key = tile * patches + token
    dedupe = exact & mergeable.to(ids.device)[tile]
    rank = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((mergeable.numel() * patches,), ids.shape[0], device=ids.device, dtype=torch.long)
    first = first.scatter_reduce(0, key[dedupe], rank[dedupe], "amin")
    valid = ~newline & (~dedupe | (first[key] == rank))
    shown = torch.where(dedupe, key, -2 - rank).masked_fill(newline, -1)
    return valid, newline, shown


def exact_rows(ids: torch.Tensor) -> torch.Tensor:
    """(L,) the rows of a packed index probe (``packed_rows``) that are an exact copy of one patch."""
    value, square = ids[:, 0], ids[:, 1]
    return (value != 0) & (value == value.round()) & (square == value * value)


def index_probe(tiles: list[int], patches: int) -> list[torch.Tensor]:
    """Per image, (tiles, P, 2) float64: 1 + t * P + p for patch p of sequence t (counted over the
    run) and its square, the probe ``packed_rows`` reads after the core's packing."""
    probes, start = [], 0
    for count in tiles:
        value = 1 + start * patches + torch.arange(count * patches, dtype=torch.float64)
        probes.append(torch.stack([value, value * value], -1).view(count, patches, 2))
        start += count
    return probes


class InstanceAttribute:
    """A handle that sets ``obj.name = value`` on the instance and, on ``remove()``, restores exactly
    what was there (the instance's own attribute, or none: the class's then shows again)."""

    def __init__(self, obj, name: str, value) -> None:
        self.obj, self.name, self.value = obj, name, value
        self.had = name in obj.__dict__
        self.previous = obj.__dict__.get(name)
        setattr(obj, name, value)

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is not self.value:
            return
        if self.had:
            setattr(self.obj, self.name, self.previous)
        else:
            delattr(self.obj, self.name)
