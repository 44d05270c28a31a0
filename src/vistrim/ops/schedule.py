"""Keep schedules across layers (prefill) and annealing curves across decoding steps."""

from __future__ import annotations

import math
from collections.abc import Sequence


def layer_ratio(
    layer: int,
    *,
    start: int,
    end: int,
    min_ratio: float,
    kind: str = "linear",
    steps: Sequence[tuple[int, float]] = (),
) -> float:
    """rho(layer): the share of the visual tokens a layer keeps; non-increasing in ``layer``.

    ``linear`` / ``cosine``: 1 up to ``start``, down to ``min_ratio`` at ``end``, constant after.
    ``step``: the ratio of the last (layer, ratio) pair at or before ``layer``, 1 before the first.
    """
    if kind == "step":
        ratio = 1.0
        for at, value in steps:
            if layer >= at:
                ratio = value
        return ratio
    if layer <= start:
        return 1.0
    if layer >= end:
        return min_ratio
    progress = (layer - start) / (end - start)
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def anneal(step: int, *, curve: str, horizon: float) -> float:
    """f(t): the share of a layer's visual cache kept at decoding step t; f(0) = 1, non-increasing.

    ``linear`` 1 - t/T and ``cosine`` (1 + cos(pi t/T))/2 reach 0 at T = ``horizon``;
    ``exponential`` exp(-t/tau) with tau = ``horizon``.
    """
    if step <= 0:
        return 1.0
    if curve == "exponential":
        return math.exp(-step / horizon)
    progress = min(1.0, step / horizon)
    if curve == "linear":
        return 1.0 - progress
    if curve == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown annealing curve {curve!r}")


def stride_ratio(layer: int, cuts: Sequence[int], prune_ratio: float, min_ratio: float = 0.0) -> float:
    """rho(layer) of a stride schedule: (1 - R)^c, c = how many cuts happen after layers before
    ``layer`` (``cuts`` lists the layer after which each cut happens; a layer listed twice cuts
    twice), never below ``min_ratio``."""
    count = sum(1 for at in cuts if at < layer)
    return max(min_ratio, (1.0 - prune_ratio) ** count) if count else 1.0
