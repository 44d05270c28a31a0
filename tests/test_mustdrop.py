"""MustDrop: its tensor maths on hand-made tensors, and each stage on the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, greedy, image_token_id, shape_images
from PIL import Image
from reference import original_positions

import vistrim
from vistrim.compat import cache_kwargs, output_cache
from vistrim.families import family_for
from vistrim.ops.mustdrop import (
    dual_keep,
    dual_margin,
    dual_scores,
    grid_windows,
    key_tokens,
    merge_plan,
    merge_windows,
    stage_counts,
    window_similarity,
)


# ---------------------------------------------------------------------- ops
def test_grid_windows_raster_and_border():
    windows = grid_windows(4, 5, 2)  # 2 x 2 full windows; column 4 is a border left out
    assert windows.tolist() == [[0, 1, 5, 6], [2, 3, 7, 8], [10, 11, 15, 16], [12, 13, 17, 18]]


def _patches():
    torch.manual_seed(0)
    patches = torch.randn(1, 16, 8)  # a 4 x 4 grid, windows of 2 x 2
    patches[0, [0, 1, 4, 5]] = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])  # window 0: identical tokens
    return patches, grid_windows(4, 4, 2)


def test_identical_window_merges_to_its_mean_and_others_stay():
    patches, windows = _patches()
    patches[0, 5] *= 3.0  # same direction, another length: cosine 1, the mean is not any one token
    similarity = window_similarity(patches, windows)
    assert similarity[0, 0].item() == pytest.approx(1.0)
    plan = merge_plan(similarity, 0.99)
    assert plan[0].tolist() == [True, False, False, False]
    tokens, valid, source = merge_windows(patches, windows, plan, similarity)
    assert valid.sum().item() == 16 - 3
    assert source[0, 0].item() == 0  # the merged token sits at its window's first patch (raster)
    torch.testing.assert_close(tokens[0, 0], patches[0, [0, 1, 4, 5]].mean(0))
    untouched = [i for i in range(16) if i not in (0, 1, 4, 5)]
    assert source[0, 1:].tolist() == untouched
    torch.testing.assert_close(tokens[0, 1:], patches[0, untouched])


def test_threshold_edge_is_inclusive():
    similarity = torch.tensor([[0.8, 0.79999, 0.95]])
    assert merge_plan(similarity, 0.8)[0].tolist() == [True, False, True]


def test_official_same_count_and_merged_first_order():
    patches, windows = _patches()
    batch = torch.cat([patches, patches.flip(1)])  # row 1: the identical window is now the last one
    similarity = window_similarity(batch, windows)
    plan = merge_plan(similarity, -1.0, same_count=True)  # everything eligible: all 4 merge
    assert plan.sum(-1).tolist() == [4, 4]
    strict = merge_plan(torch.tensor([[0.9, 0.95, 0.1], [0.99, 0.1, 0.1]]), 0.8, same_count=True)
    assert strict.tolist() == [[False, True, False], [True, False, False]]  # min count 1, most similar
    capped = merge_plan(torch.tensor([[0.9, 0.95, 0.85, 0.1]]), 0.8, limit=2)
    assert capped.tolist() == [[True, True, False, False]]  # the two most similar eligible windows
    plan = merge_plan(similarity, 0.99)
    tokens, valid, source = merge_windows(batch[:1], windows, plan[:1], similarity[:1], merged_first=True)
    assert source[0, 0].item() == 0 and source[0, 1:].tolist() == [
        i for i in range(16) if i not in (0, 1, 4, 5)
    ]
    two = torch.tensor([[True, False, False, True]])
    ranked = torch.tensor([[0.5, 0.0, 0.0, 0.9]])
    _, _, order = merge_windows(batch[:1], windows, two, ranked, merged_first=True)
    assert order[0, :2].tolist() == [10, 0]  # most similar merged window first, then the other


def test_key_set_is_top_cls_attention():
    cls = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0], [0.3, 0.3, 0.1, 0.2, 0.4]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    keys = key_tokens(cls, valid, 0.4)  # ceil(0.4 * 5) = 2 and ceil(0.4 * 4) = 2
    assert keys[0].tolist() == [False, True, False, True, False]
    assert keys[1].tolist() == [True, True, False, False, False]  # ties to the earlier, never invalid


def test_dual_attention_either_test_keeps():
    probs = torch.tensor([[[0.50, 0.01, 0.002, 0.0], [0.40, 0.001, 0.003, 0.3]]])
    g, u = dual_scores(probs, torch.tensor([[True, True]]))
    assert g[0].tolist() == pytest.approx([0.9, 0.011, 0.005, 0.3])
    assert u[0].tolist() == pytest.approx([0.5, 0.01, 0.003, 0.3])
    keep = dual_keep(g, u, alpha=0.01, beta=0.005)  # global threshold 0.01 * 1.216 = 0.01216
    assert keep[0].tolist() == [True, True, False, True]  # token 1: only the individual test keeps it
    margin = dual_margin(g, u, 0.01, 0.005)
    assert ((margin >= 1) == keep).all()


def test_stage_counts_meet_the_average():
    for target in (10.0, 20.0, 33.3, 50.0):
        counts = stage_counts(64, target, [0, 1, 2, 3], 6)
        per_layer = [64, counts[0], counts[1], counts[2], counts[3], counts[3]]
        assert abs(sum(per_layer) / 6 - target) <= 1.0
        assert counts == sorted(counts, reverse=True)
    assert min(stage_counts(64, 11.0, [0, 1, 2, 3], 6, floor=6)) >= 6


# ---------------------------------------------------------------------- on the tiny model
@pytest.fixture(scope="module")
def shapes(tiny):
    return tiny[1](images=shape_images(3), text=PROMPTS, return_tensors="pt", padding=True)


def test_keep_everything_is_identical(tiny, shapes):
    model, _ = tiny
    with torch.no_grad():
        reference = model(**shapes).logits
    tokens = greedy(model, shapes)
    with vistrim.trim(model, "mustdrop", merge_threshold=2.0, alpha=0.0, beta=0.0) as session:
        with torch.no_grad():
            assert torch.equal(model(**shapes).logits, reference)
        assert torch.equal(greedy(model, shapes), tokens)
    assert session.stats.extra["mustdrop_merged_windows"] == [0, 0, 0]


def test_merging_shrinks_the_tower_and_the_prompt(tiny, shapes):
    model, _ = tiny
    with vistrim.trim(model, "mustdrop", merge_threshold=0.9, prefill=False) as session, torch.no_grad():
        model(**shapes)
    stats = session.stats
    merged = stats.extra["mustdrop_merged_windows"]
    assert merged == [3, 4, 3]
    after = [64 - 8 * n for n in merged]  # a 3 x 3 window becomes one token
    assert stats.extra["mustdrop_visual_after_merge"] == after
    assert stats.prefill_visual()[:, 0].tolist() == [after[0]] * 6
    # the tower itself ran on fewer tokens after layer 0 (mean over images, CLS included)
    assert stats.vision_tokens == [65.0] + [1 + sum(after) / 3] * 2


def test_vision_stage_equals_shortened_prompt_reference(tiny, shapes):
    """Merging only, positions renumbered: the same as the unpatched model fed the merged image
    tokens as a shorter prompt (contiguous positions), for prefill logits and greedy decoding."""
    model, processor = tiny
    settings = {"merge_threshold": 0.9, "prefill": False, "key_ratio": 0.0, "positions": "renumber"}
    single = processor(images=shape_images(3)[1:2], text=PROMPTS[1:2], return_tensors="pt")
    with vistrim.trim(model, "mustdrop", **settings) as session:
        tokens = greedy(model, single, n=5)
        stage = session.state["mustdrop_stage"]
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=single["pixel_values"]).pooler_output
        ((record, index),) = stage.lookup(list(features))
        kept = features[0][: int(record.valid[index].sum())]
    ids = single["input_ids"][0]
    image = (ids == image_token_id()).nonzero().flatten()
    embed = model.get_input_embeddings()
    prompt = torch.cat([embed(ids[: image[0]]), kept, embed(ids[image[-1] + 1 :])])[None]
    reference, cache = [], None
    with torch.no_grad():
        step = model(inputs_embeds=prompt, use_cache=True)
        for _ in range(5):
            token = step.logits[:, -1].argmax(-1)
            reference.append(int(token))
            step = model(input_ids=token[:, None], **cache_kwargs(model, output_cache(step)), use_cache=True)
    assert tokens[0].tolist() == reference
    del cache


@pytest.mark.parametrize("settings", [{"merge_threshold": 0.9}, {"merge_threshold": 0.9, "budget": 24}])
def test_batch_equals_one_by_one_per_sample_merges(tiny, shapes, settings):
    model, processor = tiny
    with vistrim.trim(model, "mustdrop", **settings) as session:
        batched = greedy(model, shapes, n=5)
        batched_average = session.stats.layer_average()
        for b, prompt in enumerate(PROMPTS):
            single = processor(images=shape_images(3)[b : b + 1], text=[prompt], return_tensors="pt")
            assert torch.equal(greedy(model, single, n=5)[0], batched[b]), b
            assert session.stats.layer_average()[0] == batched_average[b]


def test_official_mode_equal_merges(tiny, shapes):
    model, _ = tiny
    with vistrim.trim(model, "mustdrop", merge_threshold=0.9, official=True) as session, torch.no_grad():
        model(**shapes)
    assert session.stats.extra["mustdrop_merged_windows"] == [3, 3, 3]


@pytest.mark.parametrize("budget", [20, 30, 0.5, 0.3])
@pytest.mark.parametrize("rows", [1, 3])
def test_exact_budget_mode(tiny, shapes, budget, rows):
    model, _ = tiny
    inputs = {k: v[:rows] for k, v in shapes.items()}
    with vistrim.trim(model, "mustdrop", merge_threshold=0.9, budget=budget) as session, torch.no_grad():
        model(**inputs)
    target = budget * 64 if isinstance(budget, float) else budget
    assert (session.stats.layer_average() - target).abs().max() <= 1.0


def test_budget_mode_never_merges_below_the_budget(tiny):
    """Flat images merge every window (64 -> 32 tokens); a budget of 48 must still be met."""
    model, processor = tiny
    flat = processor(images=[Image.new("RGB", (40, 40), (90, 90, 90))], text=PROMPTS[:1], return_tensors="pt")
    with vistrim.trim(model, "mustdrop", merge_threshold=0.5, budget=48) as session, torch.no_grad():
        model(**flat)
    assert session.stats.extra["mustdrop_merged_windows"] == [2]  # (64 - 48) // 8
    assert abs(session.stats.layer_average_mean() - 48) <= 1.0


def test_key_tokens_are_never_dropped(tiny, shapes):
    model, _ = tiny
    settings = {
        "merge_threshold": 0.9,
        "alpha": 10.0,
        "beta": 10.0,
        "key_ratio": 0.25,
        "decode_evict": True,
        "decode_beta": 1.0,  # no attention passes: only the key set may stay
    }
    with vistrim.trim(model, "mustdrop", **settings) as session:
        greedy(model, shapes, n=4)
    stats = session.stats
    keys = stats.extra["mustdrop_key_tokens"]
    assert keys == [-(-n // 4) for n in stats.extra["mustdrop_visual_after_merge"]]  # ceil(25%)
    counts = stats.prefill_visual()
    assert counts[-1].tolist() == keys  # thresholds no token passes: exactly the keys remain
    assert stats.cache_visual_final[-1].tolist() == keys  # and decoding eviction spares them too


def test_either_test_keeps_a_token(tiny, shapes):
    model, _ = tiny
    base = {"merge_threshold": 2.0, "key_ratio": 0.0, "decode": False}
    with torch.no_grad():
        with vistrim.trim(model, "mustdrop", alpha=10.0, beta=0.0, **base) as only_individual:
            model(**shapes)
        with vistrim.trim(model, "mustdrop", alpha=0.0, beta=10.0, **base) as only_global:
            model(**shapes)
        with vistrim.trim(model, "mustdrop", alpha=10.0, beta=10.0, **base) as neither:
            model(**shapes)
    assert (only_individual.stats.prefill_visual() == 64).all()  # u_j >= 0 always passes
    assert (only_global.stats.prefill_visual() == 64).all()  # g_j >= 0 always passes
    assert (neither.stats.prefill_visual()[-1] == 0).all()


def test_output_aware_cache_evicts_retroactively(tiny, shapes):
    model, _ = tiny
    with vistrim.trim(model, "mustdrop", merge_threshold=2.0, budget=16) as session, torch.no_grad():
        model(**shapes)
    stats = session.stats
    final = stats.prefill_visual()[-1]
    first = min(session.method.pruning_layers(6))
    assert (stats.cache_visual_prefill[:first] == 64).all()  # before the first pruning layer: all
    assert (stats.cache_visual_prefill[first:] == final).all()  # from it on: the last survivors
    with vistrim.trim(model, "mustdrop", merge_threshold=2.0, budget=16, decode=False) as session:
        with torch.no_grad():
            model(**shapes)
    assert session.stats.cache_visual_prefill[first].tolist() == [64, 64, 64]


def test_eager_scoring_equals_rows(tiny, shapes):
    model, _ = tiny
    results = {}
    for attention in ("rows", "eager"):
        with vistrim.trim(model, "mustdrop", merge_threshold=0.9, budget=24, attention=attention) as session:
            with torch.no_grad():
                results[attention] = (model(**shapes).logits, session.stats.prefill_visual())
    assert torch.equal(results["rows"][1], results["eager"][1])
    torch.testing.assert_close(results["rows"][0], results["eager"][0], atol=1e-5, rtol=0)


def test_cls_row_equals_eager_tower_attention(tiny, tiny_eager, shapes):
    model, _ = tiny
    eager, _ = tiny_eager
    with vistrim.trim(model, "mustdrop", merge_threshold=2.0) as session, torch.no_grad():
        features = model.model.get_image_features(pixel_values=shapes["pixel_values"]).pooler_output
        found = session.state["mustdrop_stage"].lookup(list(features))
    with torch.no_grad():
        maps = eager.model.vision_tower(shapes["pixel_values"], output_attentions=True).attentions[-1]
    expected = maps[:, :, 0, 1:].mean(1)  # CLS row, head-averaged, patches only
    got = torch.stack([record.cls[i] for record, i in found])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_renumbered_positions_are_contiguous_per_layer(tiny, shapes):
    """With renumbering each layer's tokens get positions 0..n-1 over its live entries, also for
    the tokens generated later (checked against the positions the model was given)."""
    model, _ = tiny
    seen = {}
    layer = family_for(model).layers[5]

    def record(module, args, kwargs):
        seen.setdefault("calls", []).append(kwargs["position_ids"].clone())

    handle = None
    with vistrim.trim(model, "mustdrop", merge_threshold=0.9, budget=20, positions="renumber") as session:
        handle = layer.register_forward_pre_hook(record, with_kwargs=True)
        greedy(model, tiny[1](images=shape_images(3)[1:2], text=PROMPTS[1:2], return_tensors="pt"), n=3)
    handle.remove()
    prefill, first_step = seen["calls"][0], seen["calls"][1]
    assert prefill[0].tolist() == list(range(prefill.shape[1]))
    assert first_step[0].tolist() == [prefill.shape[1]]
    assert session.stats.prefill_visual()[5, 0] < 64


def test_original_positions_are_kept(tiny, shapes):
    model, _ = tiny
    seen = []
    layer = family_for(model).layers[5]
    single = tiny[1](images=shape_images(3)[1:2], text=PROMPTS[1:2], return_tensors="pt")
    with vistrim.trim(model, "mustdrop", merge_threshold=0.9, budget=20):
        handle = layer.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["position_ids"].clone()), with_kwargs=True
        )
        greedy(model, single, n=2)
    handle.remove()
    full = original_positions(single["attention_mask"])[0]
    assert set(seen[0][0].tolist()) < set(full.tolist())  # a subset of the original positions
    assert seen[1][0].tolist() == [single["input_ids"].shape[1]]  # new tokens continue after the prompt


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window": 1}, "mustdrop.window"),
        ({"merge_threshold": -2}, "mustdrop.merge_threshold"),
        ({"key_ratio": 1.5}, "mustdrop.key_ratio"),
        ({"alpha": -1}, "mustdrop.alpha"),
        ({"beta": -0.1}, "mustdrop.beta"),
        ({"layers": "6,2"}, "mustdrop.layers"),
        ({"layers": ""}, "mustdrop.layers"),
        ({"preset": "100"}, "mustdrop.preset"),
        ({"budget": 1.5}, "mustdrop.budget"),
        ({"positions": "shifted"}, "mustdrop.positions"),
        ({"attention": "flash"}, "mustdrop.attention"),
        ({"decode_every": 0}, "mustdrop.decode_every"),
    ],
)
def test_settings_are_validated(settings, message):
    with pytest.raises(vistrim.VistrimError, match=message) as info:
        vistrim.build("mustdrop", **settings)
    assert "\n" not in str(info.value)


def test_presets_and_model_checks(tiny):
    assert vistrim.build("mustdrop", preset="64").thresholds == (0.011, 0.01)
    assert vistrim.build("mustdrop").thresholds == (0.001, 0.001)
    # an explicit setting wins over the preset's; the recorded settings say what ran
    explicit = vistrim.build("mustdrop", preset="64", alpha=0.5)
    assert explicit.thresholds == (0.5, 0.01)
    assert (explicit.settings()["alpha"], explicit.settings()["beta"]) == (0.5, 0.01)
    assert vistrim.build("mustdrop", **explicit.settings()).thresholds == (0.5, 0.01)
    assert vistrim.build("mustdrop", preset="128", beta="0.2").thresholds == (0.0012, 0.2)
    with pytest.raises(vistrim.VistrimError, match="mustdrop.window"):
        vistrim.apply(tiny[0], "mustdrop", window=9)  # the tiny tower's grid is 8 x 8
    with pytest.raises(vistrim.VistrimError, match="mustdrop.key_layer"):
        vistrim.apply(tiny[0], "mustdrop", key_layer=0)
    with pytest.raises(vistrim.VistrimError, match="mustdrop.merge_layer"):
        vistrim.apply(tiny[0], "mustdrop", merge_layer=2)


def test_llava_with_a_tower_without_cls_skips_or_refuses_the_vision_stage():
    """A LLaVA whose tower has no CLS token (SigLIP): vision=auto runs the language-model stages,
    vision=true is refused in one line; the model is left untouched."""
    from conftest import no_hooks
    from transformers import SiglipVisionConfig

    from vistrim.models.tiny import build_processor, llava_from_configs

    processor = build_processor(32, 4)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
    )
    model = llava_from_configs(
        processor,
        vision,
        0,
        "sdpa",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model.config.vision_feature_select_strategy = "full"
    processor.num_additional_image_tokens = 0
    processor.vision_feature_select_strategy = "full"
    inputs = processor(images=shape_images(1), text=PROMPTS[:1], return_tensors="pt")
    with vistrim.trim(model, "mustdrop", budget=0.3) as session:
        greedy(model, inputs, n=2)
    assert session.stats.extra["mustdrop_vision_stage"] is False
    assert session.stats.layer_average_mean() < session.stats.visual_in.double().mean()
    with pytest.raises(vistrim.VistrimError, match="CLIP-like tower") as info:
        vistrim.apply(model, "mustdrop", vision=True)
    assert "\n" not in str(info.value) and no_hooks(model)
