"""MustDrop's tensor maths: window similarity and merging, key selection, dual-attention scores."""

from __future__ import annotations

import math

import torch


def grid_windows(grid_h: int, grid_w: int, window: int) -> torch.Tensor:
    """Patch indices (W, window*window) of the full non-overlapping windows of a raster grid.

    Windows are listed in raster order; border patches that do not fill a window are in none.
    """
    rows, cols = grid_h // window, grid_w // window
    r = torch.arange(rows)[:, None, None, None] * window + torch.arange(window)[None, None, :, None]
    c = torch.arange(cols)[None, :, None, None] * window + torch.arange(window)[None, None, None, :]
    return (r * grid_w + c).reshape(rows * cols, window * window)


def window_similarity(patches: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity inside each window, self-pairs excluded.

    patches: (B, P, D); windows: (W, k) patch indices. Returns (B, W) float32.
    """
    x = torch.nn.functional.normalize(patches.float()[:, windows], dim=-1)  # (B, W, k, D)
    sim = x @ x.transpose(-1, -2)
    k = windows.shape[1]
    off_diagonal = sim.sum((-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (k * (k - 1))


def merge_plan(
    similarity: torch.Tensor,
    threshold: float,
    same_count: bool = False,
    limit: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Which windows merge: those with similarity >= threshold. (B, W) bool.

    ``same_count`` (the released code): every sample merges only its most similar windows, as many
    as the sample with the fewest eligible windows has. ``limit`` (an int, or (B,) per sample): at
    most that many per sample, the most similar first.
    """
    eligible = similarity >= threshold
    lowest = None if limit is None else int(limit.min()) if torch.is_tensor(limit) else limit
    if not same_count and (lowest is None or lowest >= similarity.shape[-1]):
        return eligible
    counts = eligible.sum(-1)
    if same_count:
        counts = counts.min().expand_as(counts)
    if limit is not None:
        counts = torch.minimum(counts, torch.as_tensor(limit, device=counts.device))
    order = torch.argsort(
        similarity.masked_fill(~eligible, float("-inf")), dim=-1, descending=True, stable=True
    )
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return (ranks < counts[:, None]) & eligible


def merge_windows(
    patches: torch.Tensor,
    windows: torch.Tensor,
    merged: torch.Tensor,
    similarity: torch.Tensor,
    merged_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace the tokens of every merged window by their plain mean.

    patches: (B, P, D); windows: (W, k); merged, similarity: (B, W). Each output token is a group:
    a merged window (represented by its first patch) or a single untouched patch. Order: raster
    by representative patch, or (``merged_first``, the released code) merged tokens first, most
    similar window first, then the untouched patches in raster order.
    Returns tokens (B, M, D), valid (B, M) bool (rows with fewer groups are padded at the end)
    and source (B, M) long, the representative patch index of each token.
    """
    batch, count, dim = patches.shape
    group = torch.arange(count, device=patches.device).repeat(batch, 1)  # (B, P): own index
    members = windows.to(patches.device)[None].expand(batch, -1, -1)  # (B, W, k)
    representative = members[..., :1].expand_as(members)
    group.scatter_(
        1,
        members.reshape(batch, -1),
        torch.where(merged[..., None], representative, members).reshape(batch, -1),
    )
    sums = torch.zeros_like(patches, dtype=torch.float32).scatter_add_(
        1, group[..., None].expand(-1, -1, dim), patches.float()
    )
    sizes = torch.zeros(batch, count, device=patches.device).scatter_add_(
        1, group, torch.ones_like(group, dtype=torch.float32)
    )
    is_group = sizes > 0
    key = torch.arange(count, device=patches.device, dtype=torch.float32).repeat(batch, 1)
    if merged_first:
        rank = torch.full((batch, count), float(count), device=patches.device)
        order_w = torch.argsort(
            similarity.masked_fill(~merged, float("-inf")), dim=-1, descending=True, stable=True
        )
        window_rank = torch.empty_like(order_w).scatter_(
            1, order_w, torch.arange(order_w.shape[1], device=patches.device).expand_as(order_w)
        )
        first_patch = windows[:, 0].to(patches.device)[None].expand(batch, -1)
        rank.scatter_(1, first_patch, torch.where(merged, window_rank.float() - count, float(count)))
        key = torch.where(rank < 0, rank, key)
    key = key.masked_fill(~is_group, float("inf"))
    order = torch.argsort(key, dim=-1, stable=True)
    width = int(is_group.sum(-1).max())
    order = order[:, :width]
    tokens = (sums / sizes.clamp(min=1)[..., None]).gather(1, order[..., None].expand(-1, -1, dim))
    return tokens.to(patches.dtype), is_group.gather(1, order), order


def patch_tokens(
    windows: torch.Tensor, merged: torch.Tensor, source: torch.Tensor, num_patches: int
) -> torch.Tensor:
    """Which output token of ``merge_windows`` each patch went into.

    windows: (W, k); merged: (B, W); source: (B, M), the representative patch of each token (as
    ``merge_windows`` returns it). Returns (B, P) long: the token index (0..M-1) of every patch.
    """
    batch, device = merged.shape[0], merged.device
    group = torch.arange(num_patches, device=device).repeat(batch, 1)
    members = windows.to(device)[None].expand(batch, -1, -1)
    representative = torch.where(merged[..., None], members[..., :1].expand_as(members), members)
    group.scatter_(1, members.reshape(batch, -1), representative.reshape(batch, -1))
    token = torch.full((batch, num_patches), -1, dtype=torch.long, device=device)
    # padding entries of ``source`` name patches that represent no token; they are never looked up
    token.scatter_(1, source, torch.arange(source.shape[1], device=device).expand_as(source))
    return token.gather(1, group)


def key_tokens(cls_attention: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """The key set: the top ceil(ratio * valid count) tokens of each row by CLS attention. (B, n) bool."""
    counts = torch.ceil(valid.sum(-1).double() * ratio - 1e-9).long()
    scores = cls_attention.float().masked_fill(~valid, float("-inf"))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (ranks < counts[:, None]) & valid


def dual_scores(probs: torch.Tensor, query_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global g_j = sum_i S[i, j] and individual u_j = max_i S[i, j] of the attention S (B, m, V)
    that the valid query rows pay to the visual tokens. Returns (g, u), each (B, V)."""
    s = probs.float() * query_valid[..., None]
    return s.sum(1), s.max(1).values


def dual_keep(g: torch.Tensor, u: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """A token survives if either test keeps it: g_j >= alpha * sum_j g_j or u_j >= beta. (B, V)."""
    return (g >= alpha * g.sum(-1, keepdim=True)) | (u >= beta)


def dual_margin(g: torch.Tensor, u: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """max(g_j / (alpha * sum g), u_j / beta): >= 1 exactly where ``dual_keep`` keeps a token, so a
    top-k on it is the dual test with thresholds scaled to meet a budget. (B, V)."""
    total = g.sum(-1, keepdim=True).clamp(min=1e-12)
    return torch.maximum(g / (alpha * total), u / beta)


def stage_counts(
    n: int, target: float, stage_layers: list[int], num_layers: int, floor: int = 0, post_cut: bool = False
) -> list[int]:
    """Visual tokens to keep after each pruning layer so that the layer average is ``target``.

    Layers up to the first pruning layer see all ``n``; after pruning layer s the count is
    n * lam^(s+1) for one lam solved by bisection; the last stage's count then absorbs rounding
    so the average lands within one token of the target. Counts never go below ``floor``.
    The average counts what each layer processes, or with ``post_cut`` what a layer leaves after its
    cut (how the released code logs it): every stage then covers its pruning layer too.
    """
    shift = int(post_cut)
    ends = [*stage_layers[1:], num_layers - 1 + shift]
    spans = [end - start for start, end in zip(stage_layers, ends)]
    head = n * (stage_layers[0] + 1 - shift)

    def counts(lam: float) -> list[int]:
        return [max(floor, min(n, math.floor(n * lam ** (s + 1) + 0.5))) for s in range(len(stage_layers))]

    def average(c: list[int]) -> float:
        return (head + sum(k * span for k, span in zip(c, spans))) / num_layers

    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if average(counts(middle)) < target else (low, middle)
    best = counts(high)
    # the last stage covers spans[-1] layers: one token there moves the average by spans[-1] / L
    missing = (target - average(best)) * num_layers / max(1, spans[-1])
    best[-1] = max(floor, min(best[-2] if len(best) > 1 else n, best[-1] + round(missing)))
    return best
