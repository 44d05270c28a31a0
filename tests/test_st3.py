"""ST3: the prefill schedule and the decoding annealing follow their formulas exactly.

Expected counts are computed here from the spec's formulas, independently of the method's code.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPTS, encode, greedy, images

import vistrim
from vistrim.models.tiny import build_tiny


def spec_ratio(layer, start, end, min_ratio, kind):
    if layer <= start:
        return 1.0
    if layer >= end:
        return min_ratio
    x = (layer - start) / (end - start)
    shape = 1 - x if kind == "linear" else (1 + math.cos(math.pi * x)) / 2
    return min_ratio + (1 - min_ratio) * shape


def spec_anneal(t, curve, horizon):
    if curve == "exponential":
        return math.exp(-t / horizon)
    x = min(1.0, t / horizon)
    return 1 - x if curve == "linear" else (1 + math.cos(math.pi * x)) / 2


def ceil_count(n, ratio):
    return math.ceil(round(n * ratio, 9))


@pytest.mark.parametrize(
    ("settings", "start", "end"),
    [
        ({"start_layer": 1, "end_layer": 5, "min_ratio": 0.1, "depth_ref": 0, "schedule": "linear"}, 1, 5),
        ({"start_layer": 0, "end_layer": 4, "min_ratio": 0.0, "schedule": "cosine", "depth_ref": 0}, 0, 4),
        (
            {
                "start_layer": 2,
                "end_layer": 3,
                "min_ratio": 0.25,
                "depth_ref": 0,
                "queries": "text",
                "schedule": "linear",
            },
            2,
            3,
        ),
        ({"schedule": "linear"}, 0, 3),  # K=2, E=18 of 32 layers -> 0 and 3 of 6
    ],
)
def test_prefill_counts_follow_schedule(tiny, batch, settings, start, end):
    model, _ = tiny
    with vistrim.trim(model, "st3", vta=False, **settings) as session, torch.no_grad():
        model(**batch)
    method = session.method
    expected = [
        ceil_count(64, spec_ratio(layer, start, end, method.min_ratio, method.schedule)) for layer in range(6)
    ]
    for b in range(3):
        assert session.stats.prefill_visual()[:, b].tolist() == expected


def test_step_schedule_and_depth_scaling():
    model, processor = build_tiny(seed=1, num_layers=10)
    inputs = encode(processor, PROMPTS)
    # pairs given for a 32-layer model: layers 8 and 16 -> 2.5 -> 3 and 5 of 10
    with vistrim.trim(model, "st3", vta=False, schedule="step", steps="8:0.5,16:0.125") as session:
        with torch.no_grad():
            model(**inputs)
    assert session.stats.prefill_visual()[:, 0].tolist() == [64, 64, 64, 32, 32, 8, 8, 8, 8, 8]
    # a linear schedule given for 32 layers: K=2 -> 1 (0.625 rounds up), E=18 -> 6 (5.625 rounds up)
    with vistrim.trim(model, "st3", vta=False, schedule="linear") as session, torch.no_grad():
        model(**inputs)
    expected = [ceil_count(64, spec_ratio(layer, 1, 6, 0.0, "linear")) for layer in range(10)]
    assert session.stats.prefill_visual()[:, 0].tolist() == expected


def test_selection_is_nested(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "st3", vta=False, queries="text") as session, torch.no_grad():
        model(**batch)
    for layer in range(1, 6):
        for above, below in zip(session.stats.kept_positions(layer - 1), session.stats.kept_positions(layer)):
            assert set(below.tolist()) <= set(above.tolist())


@pytest.mark.parametrize(
    "settings",
    [
        {"curve": "linear", "horizon": 6.0},
        {"curve": "cosine", "horizon": 5.0, "every": 3},
        {"curve": "exponential", "horizon": 3.0, "min_keep": 4},
        {"curve": "linear", "horizon": 4.0, "min_keep": 0.25, "smoothing": 0.5, "every": 2},
        {"curve": "linear", "horizon": 7.0, "pvtp": False},
    ],
)
def test_decoding_counts_follow_annealing(tiny, batch, settings):
    model, _ = tiny
    steps = 10
    with vistrim.trim(model, "st3", **settings) as session:
        greedy(model, batch, n=steps)
    method = session.method
    n0 = session.stats.cache_visual_prefill
    assert len(session.stats.decode_visual) == steps - 1  # forwards for generated tokens 0..n-2
    for t, counts in enumerate(session.stats.decode_visual):
        selected = max(u for u in range(t + 1) if u == 0 or u % method.every == 0)
        factor = spec_anneal(selected, method.curve, method.horizon) if selected else 1.0
        for layer in range(6):
            for b in range(3):
                n = int(n0[layer, b])
                floor = (
                    method.min_keep if isinstance(method.min_keep, int) else ceil_count(n, method.min_keep)
                )
                expected = min(n, max(ceil_count(n, factor), floor))
                assert int(counts[layer, b]) == expected, (t, layer, b)


def test_memory_only_goes_down_and_lands_low(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "st3", horizon=12.0, every=2) as session:
        greedy(model, batch, n=12)
    history = torch.stack([session.stats.cache_visual_prefill, *session.stats.decode_visual])
    assert (history[1:] <= history[:-1]).all()
    assert session.stats.kv_ratio_final() < session.stats.kv_ratio_prefill() < 1.0


def test_vta_only_keeps_prefill_whole(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "st3", pvtp=False, horizon=4.0, every=1) as session:
        greedy(model, batch, n=6)
    assert (session.stats.prefill_visual() == 64).all()
    assert (session.stats.cache_visual_final == 0).all()


def test_beam_search_with_annealing_batch_equals_one_by_one(tiny, batch):
    """Beams evict different entries; beam reordering must carry each cache layer's record."""
    model, processor = tiny
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": 2, "do_sample": False}
    with vistrim.trim(model, "st3", horizon=5.0, every=1), torch.no_grad():
        batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
        for b, prompt in enumerate(PROMPTS):
            single = processor(images=images(3)[b : b + 1], text=[prompt], return_tensors="pt")
            alone = model.generate(**single, **kwargs)[:, single["input_ids"].shape[1] :]
            assert torch.equal(alone[0], batched[b]), b


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"start_layer": -1}, "st3.start_layer"),
        ({"start_layer": 10, "end_layer": 4}, "st3.end_layer"),
        ({"min_ratio": 1.5}, "st3.min_ratio"),
        ({"schedule": "zigzag"}, "st3.schedule"),
        ({"schedule": "step"}, "st3.steps is empty"),
        ({"schedule": "step", "steps": "16:0.5,8:0.25"}, "increasing"),
        ({"schedule": "step", "steps": "8:0.25,16:0.5"}, "non-increasing"),
        ({"schedule": "step", "steps": "8"}, "st3.steps"),
        ({"queries": "first"}, "st3.queries"),
        ({"curve": "square"}, "st3.curve"),
        ({"horizon": 0}, "st3.horizon"),
        ({"min_keep": -1}, "st3.min_keep"),
        ({"min_keep": 1.5}, "st3.min_keep"),
        ({"every": 0}, "st3.every"),
        ({"smoothing": 1.0}, "st3.smoothing"),
        ({"depth_ref": -1}, "st3.depth_ref"),
        ({"pvtp": "maybe"}, "st3.pvtp"),
        ({"vta": 2}, "st3.vta"),
    ],
)
def test_every_field_is_validated(settings, message):
    with pytest.raises(vistrim.VistrimError, match=message) as info:
        vistrim.build("st3", **settings)
    assert "\n" not in str(info.value)


def test_end_layer_beyond_depth(tiny):
    with pytest.raises(vistrim.VistrimError, match="beyond"):
        vistrim.apply(tiny[0], "st3", schedule="linear", end_layer=40)
    with pytest.raises(vistrim.VistrimError, match="beyond the model"):
        vistrim.apply(tiny[0], "st3", schedule="linear", depth_ref=0, end_layer=9)


# ---------------------------------------------------------------------- literal schedules
@pytest.mark.parametrize(
    ("settings", "n", "layers", "expected"),
    [
        # defaults on LLaVA-1.5-geometry (30 layers): K = 2 -> 1.875 -> 2, E = 18 -> 16.875 -> 17;
        # rho(l) = 1 - (l - 2) / 15 in between: 576 * 14/15 = 537.6 -> 538, ..., 576 / 15 = 38.4 -> 39
        (
            {"schedule": "linear"},
            576,
            30,
            [576, 576, 576, 538, 500, 461, 423, 384, 346, 308, 269, 231, 192, 154, 116, 77, 39] + [0] * 13,
        ),
        # the defaults (stride: K=2, S=2, R=0.2 of 32) on 30 layers: cuts after 2, 4, 6, 8, 9, 11, ...
        # (32-layer cuts 2, 4, ..., 30 scaled by 30/32), 576 * 0.8 = 460.8 -> 461, * 0.64 -> 369, ...
        (
            {},
            576,
            30,
            [576, 576, 576, 461, 461, 369, 369, 295, 295, 236, 189, 189, 151, 151, 121]
            + [121, 97, 97, 78, 78, 62, 62, 50, 50, 40, 32, 32, 26, 26, 21],
        ),
        # cosine K=0, E=4: (1 + cos(pi/4)) / 2 * 64 = 54.6 -> 55, 0.5 -> 32, 0.146 * 64 = 9.4 -> 10
        (
            {"schedule": "cosine", "start_layer": 0, "end_layer": 4, "depth_ref": 0},
            64,
            6,
            [64, 55, 32, 10, 0, 0],
        ),
        # stride: cuts after layers 1, 3, 5 (and 7, which no layer follows), each halving
        (
            {"schedule": "stride", "start_layer": 1, "stride": 2, "prune_ratio": 0.5, "depth_ref": 0},
            64,
            8,
            [64, 64, 32, 32, 16, 16, 8, 8],
        ),
        # stride given for 32 layers on 16: cuts after 2, 10, 18, 26 -> 1, 5, 9, 13
        (
            {"schedule": "stride", "start_layer": 2, "stride": 8, "prune_ratio": 0.5},
            64,
            16,
            [64, 64, 32, 32, 32, 32, 16, 16, 16, 16, 8, 8, 8, 8, 4, 4],
        ),
        # stride with a floor: 1, 0.5, 0.25, then 0.2 instead of 0.125: ceil(12.8) = 13
        (
            {
                "schedule": "stride",
                "start_layer": 0,
                "stride": 1,
                "prune_ratio": 0.5,
                "min_ratio": 0.2,
                "depth_ref": 0,
            },
            64,
            6,
            [64, 32, 16, 13, 13, 13],
        ),
    ],
)
def test_literal_schedules(settings, n, layers, expected):
    assert vistrim.build("st3", **settings).predict_prefill(n, layers) == expected


def test_stride_schedule_runs_as_written(tiny, batch):
    # cuts after layers 0, 2, 4 keeping 3/4 of what is left: 64, 48, 36, ceil(27.0) = 27
    settings = {"schedule": "stride", "start_layer": 0, "stride": 2, "prune_ratio": 0.25, "depth_ref": 0}
    with vistrim.trim(model := tiny[0], "st3", vta=False, **settings) as session, torch.no_grad():
        model(**batch)
    assert session.stats.prefill_visual()[:, 0].tolist() == [64, 48, 48, 36, 36, 27]


def test_stride_budget_mode_solves_the_ratio():
    method = vistrim.at_budget("st3", 0.33, n_visual=576, num_layers=30, schedule="stride")
    assert method.schedule == "stride" and method.start_layer == vistrim.build("st3").start_layer
    assert abs(sum(method.predict_prefill(576, 30)) / 30 - 0.33 * 576) <= 1.0
    low = vistrim.at_budget("st3", 20, n_visual=144, num_layers=8, schedule="stride", start_layer=4)
    assert low.start_layer < 4 and abs(sum(low.predict_prefill(144, 8)) / 8 - 20) <= 1.0
