"""MustDrop's vision stage on the tile families (LLaVA-NeXT, NeXT-Video, OneVision): a merge inside
each tile's tower sequence, tiles padded back spatially so the core packs them itself, one
placeholder kept per merged token that survives the unpad crop (newline rows kept), the key set
ranked by the packed importance; OneVision images whose grid is interpolated merge their base
tile only. Tiny models from the families' builders, no hub."""

from __future__ import annotations

import pytest
import torch
from conftest import no_hooks
from test_families import QUESTIONS, encode, greedy, picture, prompt
from test_llava_next import newline_rows, video_batch

import vistrim
from vistrim.errors import VistrimError
from vistrim.families import FAMILIES, family_for

NAMES = ("llava_next", "llava_onevision")
MERGE = {"merge_threshold": 0.0, "window": 2}  # per-tile merges that differ between images


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    model, processor = FAMILIES[request.param].tiny(seed=0)
    return request.param, model, processor, encode(processor, QUESTIONS)


def first_layer_inputs(model) -> tuple[list, object]:
    """A pre-hook (to register inside a session, so it runs after vistrim's) that records what
    the first decoder layer processes."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    return seen, hook


def packed_features(model, batch) -> list[torch.Tensor]:
    family = family_for(model)
    names = ("pixel_values", "image_sizes", "batch_num_images")
    with torch.no_grad():
        output = family.core.get_image_features(**{k: batch[k] for k in names if k in batch})
    return list(output.pooler_output)


def test_merge_disabled_is_the_unpatched_model(built):
    """Nothing merges (threshold above any similarity), the filter keeps all: logits and greedy
    tokens are the unpatched model's bit for bit, through forward and generate, while the stage ran
    (and the wrapper is gone afterwards)."""
    _, model, _, batch = built
    with torch.no_grad():
        reference = model(**batch).logits
    tokens = greedy(model, batch)
    core = family_for(model).core
    with vistrim.trim(model, "mustdrop", vision=True, merge_threshold=2.0, alpha=0.0, beta=0.0) as session:
        assert "get_image_features" in core.__dict__
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, reference)
        assert torch.equal(greedy(model, batch), tokens)
    stats = session.stats
    assert stats.extra["mustdrop_vision_stage"] is True
    assert stats.extra["mustdrop_merged_windows"] == [0, 0, 0]
    assert stats.extra["mustdrop_visual_after_merge"] == stats.visual_in.tolist()
    assert sum(stats.extra["mustdrop_key_tokens"]) > 0  # the key set ran on the packed rows
    assert "get_image_features" not in core.__dict__ and no_hooks(model)


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_layer0_holds_one_row_per_merged_token_surviving_the_crop(built, call):
    """After the merge the packed features repeat each merged token at every patch it covers; the
    first layer receives each distinct packed row once (a token the crop removed entirely never
    appears), all newline rows, and every dropped row was a copy of a kept one."""
    _, model, _, batch = built
    family = family_for(model)
    layout = family.layout(batch["input_ids"], batch)
    seen, hook = first_layer_inputs(model)
    with vistrim.trim(model, "mustdrop", prefill=False, decode=False, **MERGE) as session:
        features = packed_features(model, batch)
        handle = family.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            if call == "forward":
                with torch.no_grad():
                    model(**batch)
            else:
                greedy(model, batch, n=2)
        finally:
            handle.remove()
    stats = session.stats
    assert sum(stats.extra["mustdrop_merged_windows"]) > 0
    newline = family.core.image_newline
    distinct = [
        int(torch.unique(f[~(f == newline).all(-1)], dim=0).shape[0]) for f in features
    ]  # one image per row in QUESTIONS
    src, live, visual = stats.prefill_layers[0]
    assert (live & visual).sum(-1).tolist() == distinct == stats.extra["mustdrop_visual_after_merge"]
    assert distinct != layout.visual.sum(-1).tolist()  # the merge removed rows
    hidden = seen[0]
    assert hidden.shape[1] == src.shape[1] < batch["input_ids"].shape[1]
    kept = torch.zeros_like(layout.visual).scatter_(1, src, live)
    assert bool((kept | ~layout.protected).all())  # every newline row is there
    for b, feature in enumerate(features):
        rows = (layout.visual | layout.protected)[b].nonzero().flatten()
        at_layer0 = {int(p): i for i, p in enumerate(src[b].tolist()) if live[b, i]}
        kept_rows = feature[torch.tensor([int(p) in at_layer0 for p in rows])]
        for r, position in enumerate(rows.tolist()):
            if position in at_layer0:  # the row the language model reads is the packed row
                assert torch.equal(hidden[b, at_layer0[position]], feature[r])
            else:  # a dropped row repeats a kept one
                assert bool((kept_rows == feature[r]).all(-1).any())


def test_the_tower_runs_fewer_tokens_after_the_merge_layer(built):
    name, model, _, batch = built
    family = family_for(model)
    tower = family.vision_tower()
    lengths = []
    with vistrim.trim(model, "mustdrop", merge_layer=0, **MERGE) as session:
        handle = tower.layers[1].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
        try:
            # images the packing does not interpolate merge every tile
            with torch.no_grad():
                model(**{k: v[1:] for k, v in batch.items()})
        finally:
            handle.remove()
    patches = tower.grid[0] * tower.grid[1]
    assert lengths and max(lengths) < patches + tower.prefix
    per_layer = session.stats.vision_tokens
    assert per_layer[0] == patches + tower.prefix > per_layer[1] == per_layer[-1]


def test_onevision_interpolated_images_merge_their_base_tile_only():
    model, processor = FAMILIES["llava_onevision"].tiny(seed=0)
    batch = encode(processor, QUESTIONS[:1])  # 32x32: a 2x2 grid beyond anyres_max, interpolated
    tower = family_for(model).vision_tower()
    patches = tower.grid[0] * tower.grid[1]
    with vistrim.trim(model, "mustdrop", prefill=False, **MERGE) as session, torch.no_grad():
        model(**batch)
    stage = session.state["mustdrop_stage"]
    tokens = stage.last.patch_token.max(-1).values + 1  # tokens per tile
    assert tokens[0] < patches and bool((tokens[1:] == patches).all())
    (merged,) = session.stats.extra["mustdrop_merged_windows"]
    (after,) = session.stats.extra["mustdrop_visual_after_merge"]
    assert after == int(session.stats.visual_in[0]) - merged * (MERGE["window"] ** 2 - 1)


@pytest.mark.parametrize("settings", [MERGE, {**MERGE, "budget": 0.3}])
def test_batch_equals_one_by_one(built, settings):
    """Three left-padded prompts of different image sizes (one after the text) give each sample
    what it gets alone."""
    _, model, processor, batch = built
    with vistrim.trim(model, "mustdrop", **settings) as session:
        batched = greedy(model, batch, n=4)
        merged = session.stats.extra["mustdrop_merged_windows"]
        average = session.stats.layer_average()
        for b in range(len(QUESTIONS)):
            single = encode(processor, QUESTIONS[b : b + 1], first_seed=b)
            assert torch.equal(greedy(model, single, n=4)[0], batched[b]), b
            assert session.stats.extra["mustdrop_merged_windows"] == [merged[b]]
            assert session.stats.layer_average()[0] == average[b]


def test_official_mode_merges_equally_over_the_tiles_that_merge(built):
    name, model, _, batch = built
    with vistrim.trim(model, "mustdrop", official=True, **MERGE) as session, torch.no_grad():
        model(**batch)
    stage = session.state["mustdrop_stage"]
    tokens = stage.last.patch_token.max(-1).values + 1
    patches = stage.tower.grid[0] * stage.tower.grid[1]
    merging = tokens[tokens < patches]
    assert merging.numel() and bool((merging == merging[0]).all())
    if name == "llava_next":  # every tile may merge: the least similar one sets the count
        assert merging.numel() == tokens.numel()


@pytest.mark.parametrize("budget", [0.3, 0.5, 20])
def test_exact_budget_mode(built, budget):
    _, model, _, batch = built
    with vistrim.trim(model, "mustdrop", budget=budget, **MERGE) as session, torch.no_grad():
        model(**batch)
    stats = session.stats
    if isinstance(budget, float):  # a count above a tile's patches leaves no tile room to merge
        assert sum(stats.extra["mustdrop_merged_windows"]) > 0
    visual = stats.visual_in.double()
    target = budget * visual if isinstance(budget, float) else torch.full_like(visual, budget)
    assert (stats.layer_average() - target).abs().max() <= 1.0


@pytest.mark.parametrize("vision", [True, False])  # false: the key set without the merge
def test_key_tokens_survive_the_filter(built, vision):
    _, model, _, batch = built
    settings = {**MERGE, "vision": vision, "alpha": 10.0, "beta": 10.0, "key_ratio": 0.2}
    layout = family_for(model).layout(batch["input_ids"], batch)
    with vistrim.trim(model, "mustdrop", **settings) as session, torch.no_grad():
        model(**batch)
    stats = session.stats
    keys = torch.tensor(stats.extra["mustdrop_key_tokens"])
    after = torch.tensor(stats.extra["mustdrop_visual_after_merge"])
    assert bool((after < stats.visual_in).any()) is vision
    assert bool((keys == torch.ceil(after * 0.2 - 1e-9).long()).all())
    # every visual token the filter could drop is gone but the key set (and newlines) remain
    assert torch.equal(stats.prefill_visual()[-1], keys)
    src, live, _ = stats.prefill_layers[-1]
    kept = torch.zeros_like(layout.protected).scatter_(1, src, live)
    assert bool((kept | ~layout.protected).all())


def test_hooks_and_wrapper_are_removed_on_exit_and_on_error(built):
    _, model, _, batch = built
    core = family_for(model).core
    with pytest.raises(RuntimeError, match="boom"):
        with vistrim.trim(model, "mustdrop", **MERGE), torch.no_grad():
            model(**batch)
            raise RuntimeError("boom")
    assert "get_image_features" not in core.__dict__ and no_hooks(model)
    # an instance attribute that was there before comes back exactly
    own = core.get_image_features
    core.get_image_features = own
    try:
        with vistrim.trim(model, "mustdrop", **MERGE), torch.no_grad():
            assert core.__dict__["get_image_features"] is not own
            model(**batch)
        assert core.__dict__["get_image_features"] is own
    finally:
        del core.get_image_features
    with vistrim.trim(model, "mustdrop", **MERGE) as session:
        greedy(model, batch, n=2)
    assert session.stats.extra["mustdrop_vision_stage"] and no_hooks(model)
    assert "get_image_features" not in core.__dict__


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"vision_feature_layer": [-2, -1]}, "single vision_feature_layer"),
        ({"vision_feature_select_strategy": "swap"}, "vision_feature_select_strategy"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_impossible_settings_are_refused_in_one_line(name, change, reason):
    model, processor = FAMILIES[name].tiny(seed=0)
    config = family_for(model).config
    for key, value in change.items():
        if value == "swap":
            value = "full" if config.vision_feature_select_strategy == "default" else "default"
        setattr(config, key, value)
    with pytest.raises(VistrimError, match=reason) as error:
        with vistrim.trim(model, "mustdrop", vision=True):
            pass
    assert "\n" not in str(error.value)
    assert no_hooks(model) and "get_image_features" not in family_for(model).core.__dict__
    with vistrim.trim(model, "mustdrop") as session:  # auto: the language-model stages only
        assert "mustdrop_stage" not in session.state
        assert "get_image_features" not in family_for(model).core.__dict__


def test_call_with_another_feature_layer_is_refused(built):
    _, model, _, batch = built
    with vistrim.trim(model, "mustdrop", **MERGE):
        with pytest.raises(VistrimError, match="vision_feature_layer"), torch.no_grad():
            model(**batch, vision_feature_layer=0)
    assert no_hooks(model)


def test_video_frames_are_not_merged():
    """NeXT-Video and OneVision: the stage merges the image's tiles and leaves the video frames
    (same tower) alone; the frames reach the first layer as in the unpatched model."""
    for name in ("llava_next_video", "llava_onevision"):
        model, processor = FAMILIES[name].tiny(seed=0)
        batch = video_batch(processor, model)
        family = family_for(model)
        video = batch["input_ids"] == model.config.video_token_id
        unpatched, hook = first_layer_inputs(model)
        handle = family.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            model(**batch)
        handle.remove()
        seen, hook = first_layer_inputs(model)
        with vistrim.trim(model, "mustdrop", prefill=False, **MERGE) as session:
            handle = family.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
            with torch.no_grad():
                model(**batch)
            handle.remove()
        assert sum(session.stats.extra["mustdrop_merged_windows"]) > 0, name
        src, live, _ = session.stats.prefill_layers[0]
        at = video.gather(1, src) & live
        assert int(at.sum()) == int(video.sum())
        expected = unpatched[0].gather(1, src[..., None].expand(-1, -1, unpatched[0].shape[-1]))
        assert torch.equal(seen[0][at], expected[at]), name
        assert torch.equal(family.layout(batch["input_ids"], batch).protected, newline_rows(model, batch))


@pytest.mark.parametrize("name", NAMES)
def test_several_images_in_one_sample(name):
    """Two images in one prompt (OneVision: base tiles only) and one in another: nothing merged is
    the unpatched model; merged, each sample's first layer holds each image's distinct rows once."""
    model, processor = FAMILIES[name].tiny(seed=0)
    processor.tokenizer.padding_side = "left"
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is in the image ?"}]
    texts = [
        processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True),
        prompt(processor, "describe the picture", True),
    ]
    images = [[picture((32, 32), 0), picture((40, 24), 1)], [picture((24, 40), 2)]]
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    with torch.no_grad():
        reference = model(**batch).logits
    with vistrim.trim(model, "mustdrop", merge_threshold=2.0, alpha=0.0, beta=0.0), torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    with vistrim.trim(model, "mustdrop", prefill=False, decode=False, **MERGE) as session:
        features = packed_features(model, batch)
        with torch.no_grad():
            model(**batch)
    newline = family_for(model).core.image_newline
    distinct = [int(torch.unique(f[~(f == newline).all(-1)], dim=0).shape[0]) for f in features]
    assert session.stats.extra["mustdrop_visual_after_merge"] == distinct
    assert sum(session.stats.extra["mustdrop_merged_windows"]) > 0
    assert session.stats.prefill_visual()[0].tolist() == [distinct[0] + distinct[1], distinct[2]]
