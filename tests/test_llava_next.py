"""LLaVA-NeXT, NeXT-Video and OneVision beyond the family matrix: newline rows, several images per
sample, videos (pixel values made by an image processor: video processors need torchvision); the
vision stage's own invariants are in test_llava_next_vision.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import no_hooks
from test_families import QUESTIONS, encode, greedy, picture, prompt
from transformers import CLIPImageProcessorPil

import vistrim
from vistrim.families import FAMILIES, family_for

NAMES = ("llava_next", "llava_next_video", "llava_onevision")
VIDEO_NAMES = tuple(name for name in NAMES if FAMILIES[name].videos)


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    model, processor = FAMILIES[request.param].tiny(seed=0)
    return request.param, model, processor


def embeds_at_first_layer(model, inputs) -> torch.Tensor:
    """What the language model's first layer receives (the core's own scatter of the features)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = family_for(model).layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["hidden"]


def newline_rows(model, inputs) -> torch.Tensor:
    """(B, n) positions whose first-layer input is the image_newline embedding."""
    hidden = embeds_at_first_layer(model, inputs)
    return (hidden == family_for(model).core.image_newline.to(hidden.dtype)).all(-1)


def test_newline_rows_are_protected_from_either_source(built):
    """The probe of pack_image_features (pixel values + image_sizes) and the encoded features that
    generate hands over find the same newline rows: exactly where the core scatters image_newline."""
    _, model, processor = built
    batch = encode(processor, QUESTIONS)
    family = family_for(model)
    layout = family.layout(batch["input_ids"], batch)
    assert torch.equal(layout.protected, newline_rows(model, batch))
    assert bool(layout.protected.any(-1).all())  # every image of the batch has newline rows
    placeholder = batch["input_ids"] == model.config.image_token_id
    assert torch.equal(layout.visual | layout.protected, placeholder)
    assert not bool((layout.visual & layout.protected).any())
    with torch.no_grad():
        encoded = family.core.get_image_features(
            **{k: batch[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in batch}
        )
    pre = {"input_ids": batch["input_ids"], "mm_encoder_outputs": {"image": encoded}}
    again = family.layout(batch["input_ids"], pre)
    for field in ("visual", "protected", "item"):
        assert torch.equal(getattr(again, field), getattr(layout, field))


def test_pruning_never_drops_a_newline_row(built):
    _, model, processor = built
    batch = encode(processor, QUESTIONS)
    layout = family_for(model).layout(batch["input_ids"], batch)
    with vistrim.trim(model, "fastv", layer=1, keep=0.1) as session, torch.no_grad():
        model(**batch)
    for src, live, _ in session.stats.prefill_layers:
        kept = torch.zeros_like(layout.protected)
        kept.scatter_(1, src, live)
        assert bool((kept | ~layout.protected).all())


def test_vision_stage_runs_and_budgets_hold(built):
    """MustDrop's vision stage runs on every tile family (tests/test_llava_next_vision.py has its
    invariants); with it the layer-averaged budget still holds."""
    name, model, processor = built
    batch = encode(processor, QUESTIONS)
    assert not FAMILIES[name].vision_refusal and not family_for(model).vision_stage_refusal()
    with vistrim.trim(model, "mustdrop", vision=True, budget=0.3) as session, torch.no_grad():
        model(**batch)
    assert session.stats.extra["mustdrop_vision_stage"] is True
    average, visual = session.stats.layer_average_mean(), float(session.stats.visual_in.double().mean())
    assert average == pytest.approx(0.3 * visual, abs=1.0)
    assert no_hooks(model) and "get_image_features" not in family_for(model).core.__dict__


def test_vision_sequences_count_the_tiles_the_tower_runs(built):
    _, model, processor = built
    batch = encode(processor, QUESTIONS)
    family = family_for(model)
    ran = []
    handle = family.core.vision_tower.register_forward_pre_hook(lambda m, args: ran.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    assert family.vision_sequences(batch) == sum(ran) > batch["pixel_values"].shape[0]


def test_several_images_in_one_sample():
    """OneVision takes only the base tile of each image when a sample holds several; NeXT tiles
    every image. Either way the layout follows the core, and keep-all is the unpatched model."""
    for name in ("llava_next", "llava_onevision"):
        model, processor = FAMILIES[name].tiny(seed=0)
        processor.tokenizer.padding_side = "left"
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is in the image ?"}]
        texts = [
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True),
            prompt(processor, "describe the picture", True),
        ]
        images = [[picture((32, 32), 0), picture((40, 24), 1)], [picture((24, 40), 2)]]
        batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
        family = family_for(model)
        layout = family.layout(batch["input_ids"], batch)
        assert torch.equal(layout.protected, newline_rows(model, batch))
        assert layout.item.max(-1).values.tolist() == [1, 0]  # two images apart, though adjacent
        pixels = {k: batch[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in batch}
        with torch.no_grad():
            encoded = family.core.get_image_features(**pixels)
        pre = family.layout(batch["input_ids"], {"mm_encoder_outputs": {"image": encoded}})
        assert torch.equal(pre.protected, layout.protected) and torch.equal(pre.item, layout.item)
        with torch.no_grad():
            reference = model(**batch).logits
        reference_tokens = greedy(model, batch)
        with vistrim.trim(model, "fastv", keep=1.0):
            with torch.no_grad():
                assert torch.equal(model(**batch).logits, reference)
            assert torch.equal(greedy(model, batch), reference_tokens)


# ---------------------------------------------------------------------- videos
def video_batch(processor, model, frames: int = 3) -> dict:
    """Two prompts: an image and a video; a video alone. Frames are resized to the tower's input
    by an image processor with the video processors' normalisation (CLIP mean and std)."""
    side = model.config.vision_config.image_size
    frame_processor = CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False)
    rng = np.random.default_rng(7)
    clips = [[picture((20 + 4 * f, 24), int(rng.integers(1000))) for f in range(frames)] for _ in range(2)]
    videos = torch.stack([frame_processor(clip, return_tensors="pt")["pixel_values"] for clip in clips])
    with_image = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what color is it ?"}]
    video_only = [{"type": "video"}, {"type": "text", "text": "describe the picture"}]
    texts = [
        processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
        for c in (with_image, video_only)
    ]
    # The processor refuses video placeholders without its video processor: expand them (and the
    # image's) with its own replacement functions, then tokenize.
    image_inputs = processor.image_processor([picture((40, 24), 3)], return_tensors="pt")
    texts[0] = texts[0].replace(processor.image_token, processor.replace_image_token(image_inputs, 0), 1)
    for index, text in enumerate(texts):
        tokens = processor.replace_video_token({"pixel_values_videos": videos}, video_idx=index)
        texts[index] = text.replace(processor.video_token, tokens, 1)
    processor.tokenizer.padding_side = "left"
    batch = dict(processor.tokenizer(texts, return_tensors="pt", padding=True))
    batch.update(image_inputs, pixel_values_videos=videos)
    return batch


@pytest.mark.parametrize("name", VIDEO_NAMES)
def test_video_keep_all_is_identical_and_budgets_count_video_tokens(name):
    model, processor = FAMILIES[name].tiny(seed=0)
    batch = video_batch(processor, model)
    family = family_for(model)
    layout = family.layout(batch["input_ids"], batch)
    video = batch["input_ids"] == model.config.video_token_id
    assert bool((layout.visual & video).any(-1).all())
    assert torch.equal(layout.protected, newline_rows(model, batch))  # OneVision: one after each video
    assert layout.item.max(-1).values.tolist() == [1, 0]
    with torch.no_grad():
        reference = model(**batch).logits
    reference_tokens = greedy(model, batch)
    keep_all = {"merge_threshold": 2.0, "alpha": 0.0, "beta": 0.0}  # the vision stage runs, merges nothing
    for method, settings in (("fastv", {"keep": 1.0}), ("mustdrop", keep_all)):
        with vistrim.trim(model, method, **settings):
            with torch.no_grad():
                assert torch.equal(model(**batch).logits, reference)
            assert torch.equal(greedy(model, batch), reference_tokens)
    n_visual = layout.visual.sum(-1)
    with vistrim.trim(model, "fastv", layer=1, keep=0.25) as session:
        greedy(model, batch)
    counts = session.stats.prefill_visual()
    assert torch.equal(counts[0], n_visual)
    assert (counts[2:] == torch.tensor([math.ceil(int(n) * 0.25) for n in n_visual])).all()
    with vistrim.trim(model, "pdrop") as session:
        tokens = greedy(model, batch)
    assert tokens.shape == reference_tokens.shape
    assert session.stats.layer_average_mean() < float(n_visual.double().mean()) * 0.8
    assert no_hooks(model)
