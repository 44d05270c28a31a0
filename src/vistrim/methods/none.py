"""The unmodified model, run through the trimming runtime (a check that the runtime is transparent)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register


@register
@dataclass
class NoTrim(Method):
    """Keeps every visual token. Outputs are identical to the model without vistrim."""

    name = "none"
    summary = "keep every visual token (reference)"
