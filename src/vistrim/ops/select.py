"""Turning scores into keep-masks under a budget."""

from __future__ import annotations

import math

import torch


def budget_counts(budget: int | float, available: torch.Tensor) -> torch.Tensor:
    """How many tokens to keep per sample.

    budget: a float is a ratio in [0, 1] of ``available`` (rounded up), an int a count (capped at
    ``available``). available: (B,) long. Returns (B,) long.
    """
    if isinstance(budget, float):
        counts = torch.ceil(available.double() * budget - 1e-9).long()
    else:
        # a count beyond int64 (keep=10**30) means "all of them", like any count above ``available``
        counts = torch.full_like(available, min(int(budget), torch.iinfo(available.dtype).max))
    return torch.minimum(counts.clamp(min=0), available)


def ratio_count(ratio: float, n: int) -> int:
    """ceil(ratio * n) with a guard against float noise (ratio 0.3 of 10 is 3, not 4)."""
    return min(n, max(0, math.ceil(ratio * n - 1e-9)))


def kept_count(keep: int | float, n: int, rounding: str = "ceil") -> int:
    """How many of ``n`` tokens a keep setting leaves: a count is capped at ``n``; a ratio is
    rounded up (``ceil``, guarded against float noise) or to the nearest, half to even
    (``official``: Python's ``round``, as FastV's released code rounds)."""
    if not isinstance(keep, float):
        return min(max(int(keep), 0), n)
    if rounding == "official":
        return min(n, max(0, round(n * keep)))
    return ratio_count(keep, n)


def topk_mask(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``counts[b]`` highest-scoring valid entries of each row.

    scores: (B, V) float; counts: (B,) long; valid: (B, V) bool or None (all valid). Invalid entries
    are never kept. Ties are broken towards the earlier index, so the result is deterministic.
    Returns (B, V) bool.
    """
    scores = scores.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
        counts = torch.minimum(counts, valid.sum(-1))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < counts[:, None]
