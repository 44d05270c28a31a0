"""A token reducer inside the vision tower, and a CLS-row probe, for vision-stage methods.

Vision-stage methods (MustDrop) shorten the token sequence *inside* the tower, so the layers after
the reduction run on fewer tokens. ``VisionStage`` installs, for the lifetime of a session:
a forward hook that reduces the output of one tower layer; mask pre-hooks on the later layers
(images that keep different numbers of tokens are padded at the end and the padding is masked
with transformers' own mask builder); optionally a CLS-row probe at one layer, rebuilt from that
layer's captured q and k projections (the tower keeps its attention backend); and a hook on the
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
from transformers.masking_utils import create_bidirectional_mask

from ..errors import VistrimError

Reducer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class VisionRecord:
    """One encoder run: valid (I, M) real patch tokens (real first); cls (I, M) head-averaged CLS
    attention at the probe layer or None; tokens_per_layer (CLS included, mean over images);
    merged (I,) merged windows per image."""

    valid: torch.Tensor
    cls: torch.Tensor | None
    tokens_per_layer: list[float]
    merged: torch.Tensor | None
    rows: int  # N: rows per image after padding back


class VisionStage:
    def __init__(
        self,
        adapter,
        *,
        reduce_after: int | None,
        reducer: Reducer | None,
        probe_layer: int | None,
        full_matrix: bool = False,
    ) -> None:
        config = adapter.model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(
            config.vision_feature_layer, int
        ):
            raise VistrimError(
                "the vision stage needs vision_feature_select_strategy='default' and one feature layer"
            )
        self.adapter = adapter
        self.reduce_after, self.reducer = reduce_after, reducer
        self.probe_layer, self.full_matrix = probe_layer, full_matrix
        self.records: OrderedDict[int, VisionRecord] = OrderedDict()
        self._run: dict = {}

    def install(self, session) -> None:
        adapter, layers = self.adapter, self.adapter.vision_layers
        session.add_handle(adapter.vision_tower.register_forward_pre_hook(self._start))
        if self.reducer is not None:
            session.add_handle(layers[self.reduce_after].register_forward_hook(self._reduce))
            for layer in layers[self.reduce_after + 1 :]:
                session.add_handle(layer.register_forward_pre_hook(self._mask, with_kwargs=True))
        if self.probe_layer is not None:
            attn = layers[self.probe_layer].self_attn
            session.add_handle(attn.q_proj.register_forward_hook(self._capture("q")))
            session.add_handle(attn.k_proj.register_forward_hook(self._capture("k")))
            session.add_handle(layers[self.probe_layer].register_forward_hook(self._cls_row))
        session.add_handle(adapter.core.multi_modal_projector.register_forward_hook(self._pad_back))

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
        self._run = {"valid": None, "cls": None, "merged": None, "before": None}

    def _reduce(self, module, args, output):
        self._run["before"] = output.shape[1]
        hidden, self._run["valid"], self._run["merged"] = self.reducer(output)
        return hidden

    def _mask(self, module, args, kwargs):
        valid = self._run.get("valid")
        if valid is None or bool(valid.all()):
            return None
        hidden = args[0]
        config = self.adapter.vision_tower.config
        padding = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=valid)
        return (hidden, padding, *args[2:]), kwargs

    def _capture(self, name: str):
        def hook(module, args, output):
            self._run[name] = output

        return hook

    def _cls_row(self, module, args, output):
        attn = module.self_attn
        batch, length, _ = self._run["q"].shape
        q, k = (
            self._run[n].view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
            for n in "qk"
        )
        queries = q if self.full_matrix else q[:, :, :1]  # the released code materialises every row
        logits = (queries @ k.transpose(-1, -2) * attn.scale)[:, :, 0]
        if self._run.get("valid") is not None:
            logits = logits.masked_fill(~self._run["valid"][:, None, :], float("-inf"))
        self._run["cls"] = torch.softmax(logits, dim=-1).mean(1)
        self._run["q"] = self._run["k"] = None

    def _pad_back(self, module, args, output):
        geo = self.adapter.geometry
        rows = (geo.image_size // geo.patch_size) ** 2
        run, count = self._run, output.shape[0]
        valid = (
            run["valid"][:, 1:]
            if run.get("valid") is not None
            else torch.ones(output.shape[:2], dtype=torch.bool)
        )
        valid = valid.to(output.device)
        if output.shape[1] < rows:
            output = torch.cat([output, output.new_zeros(count, rows - output.shape[1], output.shape[2])], 1)
            valid = torch.cat([valid, valid.new_zeros(count, rows - valid.shape[1])], 1)
        cls = run.get("cls")
        if cls is not None:
            cls = torch.cat([cls[:, 1:], cls.new_zeros(count, rows + 1 - cls.shape[1])], 1).masked_fill(
                ~valid, 0
            )
        after = float(valid.sum(-1).double().mean()) + 1.0
        layers = len(self.adapter.vision_layers)
        if run.get("before") is None:
            per_layer = [after] * layers
        else:
            per_layer = [float(run["before"])] * (self.reduce_after + 1) + [after] * (
                layers - self.reduce_after - 1
            )
        self.records[output.untyped_storage().data_ptr()] = VisionRecord(
            valid, cls, per_layer, run.get("merged"), rows
        )
        while len(self.records) > 8:  # a few recent runs are enough; older storage may be reused
            self.records.popitem(last=False)
        return output
