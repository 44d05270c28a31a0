"""A cache layer that knows which prompt tokens it holds.

Pruning makes every decoder layer's KV cache hold a different subset of the prompt. Each layer of a
pruned run's ``DynamicCache`` is a ``TrackedLayer``: a ``DynamicLayer`` (same storage, same update)
that also records, for each prompt entry it holds, the token's original position, whether it is
live (attended) and whether it is visual. Generated tokens follow the prompt entries and are always
kept. The bookkeeping lives on the cache layer so that beam search's reordering and batch
selection move it together with the keys and values.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import VistrimError
from ..ops.compact import gather_rows, removal_index


class TrackedLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self.prompt_len = 0  # length of the original (unpruned) prompt, for positions of new tokens
        self.pos: torch.Tensor | None = None  # (B, P) original position of each held prompt entry
        self.live: torch.Tensor | None = None  # (B, P) attended (not padding, not a masked hole)
        self.visual: torch.Tensor | None = None  # (B, P) visual token
        self.all_live = True  # no padding and no holes: the layer needs no mask of its own
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._visual_live: torch.Tensor | None = None  # (B,) live visual entries, until entries change
        # Method-owned notes that must follow the rows and entries: (B, P) per held prompt entry,
        # and (B, ...) per row. Compaction gathers entry notes; row operations select both.
        self.entry_notes: dict[str, torch.Tensor] = {}
        self.row_notes: dict[str, torch.Tensor] = {}

    @property
    def held_prompt(self) -> int:
        return 0 if self.pos is None else self.pos.shape[1]

    @property
    def generated(self) -> int:
        return self.get_seq_length() - self.held_prompt

    def describe_prompt(
        self,
        prompt_len: int,
        pos: torch.Tensor,
        live: torch.Tensor,
        visual: torch.Tensor,
        all_live: bool,
        notes: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.entry_notes = dict(notes or {})
        self.prompt_len, self.pos, self.live, self.visual = prompt_len, pos, live, visual
        self.all_live, self._slots, self._visual_live = all_live, None, None

    def visual_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, V) of the held visual entries per row and their validity (live, not padding)."""
        if self._slots is None:  # recomputed only when the entries change
            self._slots = visual_slots(self.visual, self.live)
        return self._slots

    def live_visual_count(self) -> torch.Tensor:
        """(B,) live visual entries held, recomputed only when the entries change (the runtime reads
        it after every decoding step)."""
        if self._visual_live is None:
            self._visual_live = (self.live & self.visual).sum(-1)
        return self._visual_live

    def drop(self, dead: torch.Tensor) -> None:
        """Stop attending to prompt entries ``dead`` (B, P) and free their memory where rows allow."""
        if bool((dead & ~self.visual).any()):
            raise VistrimError("internal: only visual cache entries may be evicted")
        self.live, self._slots, self._visual_live = self.live & ~dead, None, None
        index = removal_index(self.visual & ~self.live)
        if index is not None:
            self._keep_prompt_entries(index)
        self.all_live = bool(self.live.all())

    def _keep_prompt_entries(self, index: torch.Tensor) -> None:
        held, length = self.held_prompt, self.get_seq_length()
        # One gather over prompt and generated entries (not a gather and a concatenation): the cache
        # is copied once, which is most of what an eviction costs while decoding.
        generated = torch.arange(held, length, device=index.device).expand(index.shape[0], -1)
        full = torch.cat([index, generated], dim=1)
        self.keys = gather_rows(self.keys, full, 2)
        self.values = gather_rows(self.values, full, 2)
        self.pos, self.live, self.visual = (t.gather(1, index) for t in (self.pos, self.live, self.visual))
        self.entry_notes = {k: v.gather(1, index) for k, v in self.entry_notes.items()}

    # Batch-level operations used by generation strategies keep the bookkeeping aligned.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 or -tokens_to_remove > self.generated:
            raise VistrimError(
                "cannot crop a pruned cache into its prompt; only generated tokens can be cropped"
            )
        super().crop(tokens_to_remove)

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self.pos is not None:
            rows = rows.to(self.pos.device)
            self._map_rows(lambda t: t.index_select(0, rows))

    def _map_rows(self, fn) -> None:
        if self.pos is None:
            return
        self.pos, self.live, self.visual = (fn(t) for t in (self.pos, self.live, self.visual))
        self._slots = self._visual_live = None
        self.entry_notes = {k: fn(v) for k, v in self.entry_notes.items()}
        self.row_notes = {k: fn(v) for k, v in self.row_notes.items()}


def visual_slots(visual: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row indices of visual entries, padded to the longest row.

    visual, live: (B, n) bool. Returns index (B, V) long into the n entries and valid (B, V) bool:
    False for padding slots (rows with fewer visual entries) and for entries no longer live.
    """
    counts = visual.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~visual).to(torch.uint8), dim=-1, stable=True)[:, :width]
    in_row = torch.arange(width, device=visual.device)[None, :] < counts[:, None]
    return order, in_row & live.gather(1, order)


def kv_bytes(layer: DynamicLayer) -> int:
    """Bytes held by one cache layer's key and value tensors."""
    if not layer.is_initialized or layer.keys is None:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
