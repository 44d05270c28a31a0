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

    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        return [n_visual] * num_layers

    def at_budget(self, target: float, n_visual: int, num_layers: int) -> NoTrim:
        return self
