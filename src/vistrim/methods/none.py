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
    keep_all_settings = {}

    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        return [n_visual] * num_layers

    def at_budget(self, target: float, n_visual: int, num_layers: int, counting: str = "processed") -> NoTrim:
        return self
