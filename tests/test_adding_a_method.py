"""The method of docs/adding-a-method.md, written outside the package as a user would, registered
here, runs in every test matrix that picks methods from the registry (tests/test_families.py and
tests/test_runtime.py: keep-all identity, masked reference, batch = one by one, prompts ending
with the image, on every family). conftest.py imports this file first, so the matrices hold the
method whichever files run in which order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest
from pydantic import Field

import vistrim
from vistrim.methods import register
from vistrim.methods.base import Budget
from vistrim.methods.scorer import ScorerMethod
from vistrim.ops.select import kept_count


# ---- the method, as in docs/adding-a-method.md ----
@register
@dataclass
class HiddenNorm(ScorerMethod):
    """Keeps the visual tokens whose hidden states have the largest norm after layer K."""

    name = "hidden-norm"
    summary = "after layer K keep the visual tokens with the largest hidden-state norm"
    keep_all_settings = {"keep": 1.0}
    pruning_settings = {"keep": 0.3}
    budget_field = "keep"

    layer: Annotated[int, Field(ge=1, description="K: the first layer that sees the reduced set")] = 2
    keep: Annotated[Budget, Field(description="visual tokens kept: a ratio or a count")] = 0.5

    def cut_layers(self, num_layers):
        return [self.layer - 1]

    def kept(self, layer, initial, current, num_layers):
        return kept_count(self.keep, current)

    def score(self, ctx, layer):
        return ctx.visual_states().norm(dim=-1)


# ---- what registering it gives ----
def test_it_is_built_listed_and_budgeted_like_a_built_in(capsys):
    from conftest import run_cli

    assert vistrim.list_methods()["hidden-norm"] is HiddenNorm
    assert vistrim.build("hidden-norm", keep="16").keep == 16
    with pytest.raises(vistrim.VistrimError, match="hidden-norm.keep") as info:
        vistrim.build("hidden-norm", keep=1.5)
    assert "\n" not in str(info.value)
    method = vistrim.at_budget("hidden-norm", 24, n_visual=64, num_layers=6)
    assert abs(sum(method.predict_prefill(64, 6)) / 6 - 24) <= 1.0
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "hidden-norm" in out and "the first layer that sees the reduced set" in out


def test_the_matrices_picked_it_up(request):
    """Every registry-driven matrix collected in this run holds the method."""
    matrix = [
        item
        for item in request.session.items
        if item.module.__name__ in ("test_families", "test_runtime") and hasattr(item, "callspec")
    ]
    if not matrix:
        pytest.skip("neither tests/test_families.py nor tests/test_runtime.py is part of this run")
    picked = {item.originalname for item in matrix if "hidden-norm" in item.callspec.id}
    for name in ("test_keep_all_is_identical_to_unpatched", "test_physical_drop_equals_masked_reference"):
        if any(item.module.__name__ == "test_families" for item in matrix):
            assert name in picked, name
    if any(item.module.__name__ == "test_runtime" for item in matrix):
        assert "test_batch_equals_one_by_one" in picked
