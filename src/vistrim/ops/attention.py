"""Attention rows rebuilt from queries and cached keys, without materialising full attention maps."""

from __future__ import annotations

import torch


def grouped_logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled dot products of a few query rows against all keys, grouped-query aware.

    q: (B, H, m, d) queries; k: (B, Hkv, n, d) keys with H a multiple of Hkv (query head h reads
    key head h // (H // Hkv), as ``repeat_kv`` does). Returns float32 logits (B, H, m, n).
    """
    batch, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.float().reshape(batch, kv_heads, group * rows, dim)
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * scaling
    return logits.view(batch, heads, rows, k.shape[2])


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scaling: float, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention probabilities of the query rows ``q`` over the keys ``k``.

    allowed: (B, m, n) bool, True where query row i may attend to key j (causality and padding),
    or None when every key is visible. Rows with no allowed key come out as zeros instead of NaN.
    Returns float32 (B, H, m, n).
    """
    logits = grouped_logits(q, k, scaling)
    if allowed is None:
        return torch.softmax(logits, dim=-1)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)
