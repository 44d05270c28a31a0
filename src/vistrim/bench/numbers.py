"""Small summaries of repeated measurements (no torch: the CLI's usage checks import this)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max beside it."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
