"""Physical removal of entries from row-aligned sequences (hidden states, KV caches)."""

from __future__ import annotations

import torch


def removal_index(removable: torch.Tensor) -> torch.Tensor | None:
    """Which entries to keep when every row must stay the same length.

    removable: (B, n) bool, entries a row no longer needs. The same number c = min over rows of
    the removable count is removed from every row (the first c removable entries); whatever a row
    could drop beyond c stays in place and must be masked by the caller. Order is preserved.
    Returns (B, n - c) long indices of the entries to keep, or None when c == 0.
    """
    c = int(removable.sum(-1).min())
    if c == 0:
        return None
    remove = removable & (removable.cumsum(-1) <= c)
    order = torch.argsort(remove.to(torch.uint8), dim=-1, stable=True)
    return order[:, : removable.shape[1] - c]


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather per-row entries along ``dim`` of ``x`` (batch first). index: (B, k), or (1, k) for the
    same entries in every row. Copies whole rows of the trailing dimensions (``index_select``,
    advanced indexing) rather than gathering element by element: the same result, several times
    faster on the KV cache and hidden states, where compaction costs the most."""
    if index.shape[0] == 1:
        return x.index_select(dim, index[0])
    if dim == 1:
        return x[torch.arange(x.shape[0], device=x.device)[:, None], index]
    return torch.stack([row.index_select(dim - 1, picked) for row, picked in zip(x, index)])
