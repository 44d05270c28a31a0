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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

# hidden (I, 1 + P, D) -> (reduced hidden, valid, merged count per image, token of each patch or None)
Reducer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclass
class VisionRecord:
    """One encoder run: valid (I, M) real patch tokens (real first); cls (I, M) importance of each
    patch at the probe layer (head-averaged CLS attention, or mean attention received) or None;
    tokens_per_layer (CLS included, mean over images);
    merged (I,) merged windows per image; patch_token (I, P) the reduced token each patch went into."""

    valid: torch.Tensor
    cls: torch.Tensor | None
    tokens_per_layer: list[float]
    merged: torch.Tensor | None
    rows: int  # N: rows per image after padding back
    patch_token: torch.Tensor | None = None


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

    def _reduce(self, module, args, output):
        self._run["before"] = output.shape[1]
        hidden, self._run["valid"], self._run["merged"], self._run["patch_token"] = self.reducer(output)
        return hidden

    def _mask(self, module, args, kwargs):
        valid = self._run.get("valid")
        if valid is None or bool(valid.all()):
            return None
        hidden = args[0]
        return (hidden, self.tower.padding_mask(hidden, valid), *args[2:]), kwargs

    def _capture(self, name: str):
        def hook(module, args, output):
            self._run[name] = output

        return hook

    def _importance(self, module, args, output):
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
        tower, run, count = self.tower, self._run, output.shape[0]
        rows, prefix = tower.rows, tower.prefix
        valid = (
            run["valid"][:, prefix:]
            if run.get("valid") is not None
            else torch.ones(output.shape[:2], dtype=torch.bool)
        )
        valid = valid.to(output.device)
        if output.shape[1] < rows:
            output = torch.cat([output, output.new_zeros(count, rows - output.shape[1], output.shape[2])], 1)
            valid = torch.cat([valid, valid.new_zeros(count, rows - valid.shape[1])], 1)
        cls = run.get("cls")
        if cls is not None:
            cls = torch.cat([cls[:, prefix:], cls.new_zeros(count, rows + prefix - cls.shape[1])], 1)
            cls = cls.masked_fill(~valid, 0)
        after = float(valid.sum(-1).double().mean()) + prefix
        layers = len(tower.layers)
        if run.get("before") is None:
            per_layer = [after] * layers
        else:
            per_layer = [float(run["before"])] * (self.reduce_after + 1) + [after] * (
                layers - self.reduce_after - 1
            )
        self.records[output.untyped_storage().data_ptr()] = VisionRecord(
            valid, cls, per_layer, run.get("merged"), rows, run.get("patch_token")
        )
        while len(self.records) > 8:  # a few recent runs are enough; older storage may be reused
            self.records.popitem(last=False)
        return output
