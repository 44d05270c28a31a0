"""The scorer base, once for every method built on it; each official rule on hand-made attention rows.

Official-rule tests give the attention rows by hand and expect literal kept indices, worked out
by hand from the released code's rule (not derived from vistrim's code).
"""

from __future__ import annotations

import pytest
import torch

import vistrim
from vistrim.methods.base import REGISTRY
from vistrim.methods.scorer import ScorerMethod
from vistrim.ops.select import kept_count, topk_mask
from vistrim.runtime.context import Rows

SCORERS = {name: cls for name, cls in sorted(REGISTRY.items()) if issubclass(cls, ScorerMethod)}


class HandMadeContext:
    """What a scorer reads at one prefill layer, with attention rows given by hand: ``this`` for
    the layer that just ran, ``next`` for the next layer (None: not available)."""

    def __init__(self, this, next=None, initial=None, num_layers: int = 8):
        self.rows = {False: torch.tensor(this), True: None if next is None else torch.tensor(next)}
        batch, width = self.rows[False].shape
        self.valid = torch.ones(batch, width, dtype=torch.bool)
        self.initial = torch.tensor(initial or [width] * batch)
        self.geometry = type("Geometry", (), {"num_layers": num_layers})()
        self.asked: list[bool] = []
        self.kept: list[list[int]] = []

    def attention(self, queries="last", per_head=False, full=False, next_layer=False):
        self.asked.append(next_layer)
        probs = self.rows[next_layer][:, None, :]  # one query row
        return Rows(probs, torch.ones(probs.shape[:2], dtype=torch.bool), self.valid)

    def visual_slots(self):
        return torch.arange(self.valid.shape[1]).expand_as(self.valid), self.valid

    def visual_counts(self):
        return self.valid.sum(-1)

    def initial_visual_counts(self):
        return self.initial

    def keep_top(self, scores, counts):
        mask = topk_mask(scores, counts, self.valid)
        self.kept = [row.nonzero().flatten().tolist() for row in mask]


THIS = [[0.10, 0.50, 0.20, 0.90, 0.30, 0.00, 0.40, 0.60]]
NEXT = [[0.70, 0.10, 0.60, 0.00, 0.20, 0.90, 0.30, 0.10]]


# ---------------------------------------------------------------------- PyramidDrop
def test_pdrop_official_ranks_with_the_next_layer():
    # 8 layers in 4 stages: cuts after layers 1, 3, 5; at the first one lambda = 0.5 keeps 4 of 8.
    official = vistrim.build("pdrop", official=True)
    ctx = HandMadeContext(THIS, NEXT)
    official.on_prefill_layer(ctx, 1)
    assert ctx.asked == [True]
    assert ctx.kept == [[0, 2, 5, 6]]  # NEXT's four largest: 0.9 (5), 0.7 (0), 0.6 (2), 0.3 (6)
    ours = vistrim.build("pdrop")
    ctx = HandMadeContext(THIS, NEXT)
    ours.on_prefill_layer(ctx, 1)
    assert ctx.asked == [False]
    assert ctx.kept == [[1, 3, 6, 7]]  # THIS's four largest: 0.9 (3), 0.6 (7), 0.5 (1), 0.4 (6)
    ctx = HandMadeContext(THIS, NEXT)
    vistrim.build("pdrop", rank="next").on_prefill_layer(ctx, 1)
    assert ctx.asked == [True] and ctx.kept == [[0, 2, 5, 6]]


def test_pdrop_official_counts_are_int_of_n_lambda_power_s():
    # N = 100, lambda = 0.3: the released code keeps int(100 * 0.3) = 30, int(100 * 0.09) = 9,
    # int(100 * 0.027) = 2 of the prompt's 100; vistrim's default compounds ceil: 30, 9, ceil(2.7) = 3.
    official = vistrim.build("pdrop", ratio=0.3, official=True)
    assert official.predict_prefill(100, 8) == [100, 100, 30, 30, 9, 9, 2, 2]
    assert vistrim.build("pdrop", ratio=0.3).predict_prefill(100, 8) == [100, 100, 30, 30, 9, 9, 3, 3]
    # at the third cut the 9 survivors of a 100-token prompt: official keeps 2, ours 3
    third = [[0.05, 0.40, 0.10, 0.80, 0.30, 0.20, 0.60, 0.00, 0.15]]
    ctx = HandMadeContext(third, third, initial=[100])
    official.on_prefill_layer(ctx, 5)
    assert ctx.kept == [[3, 6]]
    ctx = HandMadeContext(third, third, initial=[100])
    vistrim.build("pdrop", ratio=0.3).on_prefill_layer(ctx, 5)
    assert ctx.kept == [[1, 3, 6]]
    assert vistrim.build("pdrop", rounding="official").predict_prefill(576, 32)[::8] == [576, 288, 144, 72]


def test_pdrop_official_sets_its_switches_and_records_them():
    method = vistrim.build("pdrop", official="true", rank="this", positions="original")
    assert (method.rank, method.positions, method.rounding) == ("next", "renumber", "official")
    assert vistrim.build("pdrop", **method.settings()).settings() == method.settings()


# ---------------------------------------------------------------------- FastV
@pytest.mark.parametrize(
    ("keep", "n", "ceil", "official"),
    [(0.25, 10, 3, 2), (0.25, 14, 4, 4), (0.5, 5, 3, 2), (0.3, 5, 2, 2), (0.5, 576, 288, 288), (7, 5, 5, 5)],
)
def test_fastv_counts(keep, n, ceil, official):
    # released: round(N * (1 - R)) with Python's round (half to even): round(2.5) = 2, round(3.5) = 4
    assert kept_count(keep, n) == ceil
    assert kept_count(keep, n, "official") == official


def test_fastv_official_rounding_on_hand_made_rows():
    row = [[0.30, 0.10, 0.80, 0.20, 0.90, 0.00, 0.50, 0.40, 0.70, 0.60]]
    ctx = HandMadeContext(row)
    vistrim.build("fastv", keep=0.25).on_prefill_layer(ctx, 1)
    assert ctx.asked == [False] and ctx.kept == [[2, 4, 8]]  # ceil(2.5) = 3: 0.9, 0.8, 0.7
    ctx = HandMadeContext(row)
    vistrim.build("fastv", keep=0.25, rounding="official").on_prefill_layer(ctx, 1)
    assert ctx.kept == [[2, 4]]  # round(2.5) = 2


# ---------------------------------------------------------------------- the base, for every scorer
@pytest.mark.parametrize("name", sorted(SCORERS))
def test_runtime_counts_are_the_predicted_ones_and_nested(tiny, batch, name):
    model, _ = tiny
    method = vistrim.build(name, **SCORERS[name].pruning_settings)
    with vistrim.trim(model, method) as session, torch.no_grad():
        model(**batch)
    counts = session.stats.prefill_visual()
    for b in range(counts.shape[1]):
        assert counts[:, b].tolist() == method.predict_prefill(int(counts[0, b]), 6)
    for layer in range(1, 6):
        for above, below in zip(session.stats.kept_positions(layer - 1), session.stats.kept_positions(layer)):
            assert set(below.tolist()) <= set(above.tolist())


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("counting", ["processed", "post_cut"])
@pytest.mark.parametrize("budget", [0.4, 24])
def test_budget_mode_meets_the_target_counted_either_way(tiny, batch, name, counting, budget):
    model, _ = tiny
    method = vistrim.at_budget(name, budget, n_visual=64, num_layers=6, counting=counting)
    with vistrim.trim(model, method) as session, torch.no_grad():
        model(**batch)
    target = budget * 64 if isinstance(budget, float) else budget
    assert session.stats.prefill_visual()[:, 0].tolist() == method.predict_prefill(64, 6)
    assert abs(session.stats.layer_average_mean(counting) - target) <= 1.0


def test_post_cut_counting_literal(tiny, batch):
    """FastV keeping 16 of 64 before layer 2 of 6: layers process 64 64 16 16 16 16 (average 32);
    logged post-cut, layer 1 counts its 16 survivors: 64 16 16 16 16 16 (average 24)."""
    model, _ = tiny
    with vistrim.trim(model, "fastv", layer=2, keep=16) as session, torch.no_grad():
        model(**batch)
    assert session.stats.layer_average_mean() == 32.0
    assert session.stats.layer_average_mean("post_cut") == 24.0
    assert session.stats.summary()["layer_average_visual_post_cut"] == 24.0
    assert vistrim.at_budget("fastv", 24, n_visual=64, num_layers=6, counting="post_cut").keep == 16
    assert vistrim.at_budget("fastv", 24, n_visual=64, num_layers=6).keep == 4  # (2*64 + 4*4) / 6 = 24
    with pytest.raises(vistrim.VistrimError, match="counting"):
        vistrim.at_budget("fastv", 24, n_visual=64, num_layers=6, counting="paper")


def test_mustdrop_budget_counted_post_cut(tiny):
    from conftest import PROMPTS, shape_images

    model, processor = tiny
    shapes = processor(images=shape_images(3), text=PROMPTS, return_tensors="pt", padding=True)
    with vistrim.trim(model, "mustdrop", merge_threshold=0.9, budget=20, counting="post_cut") as session:
        with torch.no_grad():
            model(**shapes)
    assert (session.stats.layer_average("post_cut") - 20).abs().max() <= 1.0
    assert (session.stats.layer_average() > session.stats.layer_average("post_cut")).all()


def test_bench_budgets_may_be_counted_post_cut():
    from vistrim.bench.specs import build_configs, parse_budgets, parse_method_specs

    budgets = parse_budgets("24:post_cut,24")
    assert budgets == ["24:post_cut", 24]
    rows = build_configs(parse_method_specs("fastv"), budgets, n_visual=64, num_layers=6)
    assert [row.method.keep for row in rows] == [16, 4]  # post-cut (64 + 5*16)/6, processed (128 + 4*4)/6
    for bad in ("24:paper", "default:post_cut"):
        with pytest.raises(vistrim.VistrimError, match="bad budget"):
            parse_budgets(bad)


def test_pdrop_official_equals_an_independent_released_rule(tiny):
    """On one prompt of the tiny LLaVA (6 layers, 4 stages: stages start at layers 2, 3, 4), the
    runtime's pdrop official=true keeps the same image tokens at every layer as the released rule
    written independently, and gives the same last-token logits."""
    from conftest import PROMPTS, encode
    from reference import pdrop_released_rule

    model, processor = tiny
    single = encode(processor, PROMPTS[2:3])
    expected_kept, expected_logits = pdrop_released_rule(model, single, [2, 3, 4], [0.5, 0.25, 0.125])
    with vistrim.trim(model, "pdrop", official=True) as session, torch.no_grad():
        logits = model(**single).logits[0, -1]
    kept = [session.stats.kept_positions(layer)[0].tolist() for layer in range(6)]
    assert [len(k) for k in kept] == [64, 64, 32, 16, 8, 8]
    assert kept == expected_kept
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    with vistrim.trim(model, "pdrop") as session, torch.no_grad():  # vistrim's rule ranks differently
        model(**single)
    assert [session.stats.kept_positions(layer)[0].tolist() for layer in range(6)] != expected_kept
