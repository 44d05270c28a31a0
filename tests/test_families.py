"""Every invariant on every family: a tiny random model of each (built from a config, no hub).

A family enters this matrix by registering itself in ``vistrim.families`` with a ``tiny`` builder;
nothing here names a family, a model class or a token id.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch
from conftest import no_hooks
from PIL import Image
from reference import allowed_to_mask

import vistrim
from vistrim.errors import VistrimError
from vistrim.families import FAMILIES, REFUSED, family_for
from vistrim.methods.base import REGISTRY, Method
from vistrim.methods.scorer import ScorerMethod

VARIANTS = {name: build for family in FAMILIES.values() for name, build in family.tiny_variants().items()}
REQUIRES = {name: family.tiny_requires for family in FAMILIES.values() for name in family.tiny_variants()}


def buildable(name: str) -> list[str]:
    """The modules a variant's tiny builder needs that are missing here."""
    return [module for module in REQUIRES[name] if importlib.util.find_spec(module) is None]


@functools.cache
def tiny(name: str):
    """The SDPA model and processor of a variant, built once for every test that uses it."""
    return VARIANTS[name](seed=0)


# Video families whose tiny processor takes a video as a list of frames (``processor(videos=...)``
# needs a video processor; families whose tiny processors have none test videos in their own files).
VIDEO_VARIANTS = sorted(
    name
    for family in FAMILIES.values()
    if family.videos
    for name in family.tiny_variants()
    if not buildable(name) and getattr(tiny(name)[1], "video_processor", None) is not None
)

QUESTIONS = [
    ("what color is the shape ?", (32, 32), True),
    ("is there a red circle in the top left of the photo ?", (40, 24), True),
    ("describe the picture", (24, 40), False),  # the image after the text
]


def declared(kind: str) -> dict[str, dict]:
    """Every registered method's own test settings (``keep_all_settings``/``pruning_settings``),
    so a method registered anywhere, a test file included, joins the matrix."""
    return {
        name: dict(getattr(cls, kind))
        for name, cls in sorted(REGISTRY.items())
        if getattr(cls, kind) is not None
    }


KEEP_ALL = declared("keep_all_settings")
PRUNING = declared("pruning_settings")
SCORERS = {name: settings for name, settings in PRUNING.items() if issubclass(REGISTRY[name], ScorerMethod)}


def picture(size, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def prompt(processor, question: str, image_first: bool) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content if image_first else content[::-1]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode(processor, items, first_seed: int = 0) -> dict:
    """Left-padded inputs of (question, image size, image first) items; item i's picture has seed
    ``first_seed + i`` (so a sample encoded alone gets the picture it had in the batch)."""
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor, q, first) for q, _, first in items]
    pictures = [picture(size, first_seed + i) for i, (_, size, _) in enumerate(items)]
    return dict(processor(images=pictures, text=texts, return_tensors="pt", padding=True))


def encode_rows(processor, rows) -> dict:
    """Left-padded inputs of prompts made of parts: ("text", str), ("image", (w, h)) or ("video",
    (frames, (w, h))). Pictures are seeded by their row's seed and place, so a row encoded alone
    gets the pixels it had in the batch."""
    processor.tokenizer.padding_side = "left"
    texts, images, videos = [], [], []
    for seed, parts in rows:
        content = []
        for k, (kind, spec) in enumerate(parts):
            content.append({"type": "text", "text": spec} if kind == "text" else {"type": kind})
            if kind == "image":
                images.append(picture(spec, 100 * seed + 10 * k))
            elif kind == "video":
                frames, size = spec
                videos.append([picture(size, 100 * seed + 10 * k + f) for f in range(frames)])
        messages = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    media = {"images": images} if images else {}
    if videos:
        media["videos"] = videos
    return dict(processor(text=texts, return_tensors="pt", padding=True, **media))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    missing = buildable(request.param)
    if missing:
        pytest.skip(f"{request.param}: its tiny builder needs {', '.join(missing)}")
    model, processor = tiny(request.param)
    eager, _ = VARIANTS[request.param](seed=0, attn_implementation="eager")
    return request.param, model, eager, processor


@pytest.fixture(scope="module")
def batch(variant):
    _, _, _, processor = variant
    return encode(processor, QUESTIONS)


def test_vision_sequences_count_images_tiles_and_frames(variant, batch):
    """bench's FLOPs multiply the tower's cost by this: one sequence per image at least (tiles and
    frames add theirs); for packed towers (Qwen) one per grid row, not the packed patch count."""
    _, model, _, _ = variant
    sequences = family_for(model).vision_sequences(dict(batch))
    assert sequences >= len(QUESTIONS)
    if "image_grid_thw" in batch:
        assert sequences == batch["image_grid_thw"].shape[0]


def greedy(model, inputs, n: int = 5, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    return out[:, inputs["input_ids"].shape[1] :]


def visual_mask(model, inputs) -> torch.Tensor:
    return family_for(model).layout(inputs["input_ids"], inputs).visual


# ---------------------------------------------------------------------- transparency
@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_all_is_identical_to_unpatched(variant, batch, name):
    _, model, _, _ = variant
    with torch.no_grad():
        reference = model(**batch).logits
    reference_tokens = greedy(model, batch)
    with vistrim.trim(model, name, **KEEP_ALL[name]):
        with torch.no_grad():
            logits = model(**batch).logits
        tokens = greedy(model, batch)
    assert torch.equal(logits, reference)
    assert torch.equal(tokens, reference_tokens)
    assert no_hooks(model)


def test_hooks_are_removed_on_exit_and_on_error(variant, batch):
    _, model, _, _ = variant
    with pytest.raises(RuntimeError, match="boom"):
        with vistrim.trim(model, "fastv", keep=0.25), torch.no_grad():
            model(**batch)
            raise RuntimeError("boom")
    assert no_hooks(model)


# ---------------------------------------------------------------------- budgets
def test_budgets_are_honoured_and_text_is_kept(variant, batch):
    _, model, _, _ = variant
    visual = visual_mask(model, batch)
    n_visual = visual.sum(-1)
    with vistrim.trim(model, "fastv", layer=2, keep=0.25) as session, torch.no_grad():
        model(**batch)
    counts = session.stats.prefill_visual()
    assert torch.equal(counts[0], n_visual) and torch.equal(counts[1], n_visual)
    expected = torch.tensor([math.ceil(int(n) * 0.25) for n in n_visual])
    assert (counts[2:] == expected).all()
    text = batch["attention_mask"].bool() & ~visual
    for src, live, is_visual in session.stats.prefill_layers:
        for b in range(src.shape[0]):
            assert torch.equal(src[b][live[b] & ~is_visual[b]], text[b].nonzero().flatten())
    for name in ("mustdrop", "st3", "pdrop"):
        method = vistrim.at_budget(
            name, 0.4, n_visual=int(n_visual.min()), num_layers=session.stats.num_layers
        )
        with vistrim.trim(model, method) as session, torch.no_grad():
            model(**batch)
        assert session.stats.layer_average_mean() <= float(n_visual.double().mean())
        assert session.stats.layer_average_mean() < float(n_visual.double().mean()) * 0.8


# ---------------------------------------------------------------------- equivalence with references
def masked_forward(model, inputs, excluded: list[torch.Tensor], **kwargs):
    """Forward where decoder layer l attends to no key in ``excluded[l]`` (B, T), nothing removed."""
    family = family_for(model)
    pad = inputs["attention_mask"].bool()
    length = pad.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eager = family.text_config._attn_implementation == "eager"

    def pre(index, module, args, kw):
        allowed = causal[None] & pad[:, None, :] & ~excluded[index][:, None, :]
        kw["attention_mask"] = allowed_to_mask(allowed, eager, args[0].dtype)
        return args, kw

    handles = [
        layer.register_forward_pre_hook(partial(pre, i), with_kwargs=True)
        for i, layer in enumerate(family.layers)
    ]
    try:
        with torch.no_grad():
            return model(**inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def excluded_per_layer(stats, visual) -> list[torch.Tensor]:
    excluded = []
    for layer in range(stats.num_layers):
        kept = torch.zeros_like(visual)
        for b, positions in enumerate(stats.kept_positions(layer)):
            kept[b, positions] = True
        excluded.append(visual & ~kept)
    return excluded


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        *sorted(SCORERS.items()),
        ("pdrop", {"rank": "next"}),
        ("random", {"keep": 5}),
        ("st3", {"vta": False, "queries": "text"}),
        ("st3", {"vta": False, "schedule": "stride", "stride": 8, "prune_ratio": 0.5}),
    ],
)
def test_physical_drop_equals_masked_reference(variant, batch, name, settings):
    _, model, _, _ = variant
    with vistrim.trim(model, name, **settings) as session, torch.no_grad():
        logits = model(**batch).logits
    excluded = excluded_per_layer(session.stats, visual_mask(model, batch))
    reference = masked_forward(model, batch, excluded).logits
    compare = batch["attention_mask"].bool() & ~torch.stack(excluded).any(0)
    torch.testing.assert_close(logits[compare], reference[compare], atol=1e-5, rtol=0)


@dataclass
class Probe(Method):
    """Records the attention rows the runtime rebuilds from q and k at one layer (or, with
    ``next_layer``, the rows the next layer will compute, from this layer's output)."""

    name = "probe"
    layer: int = 1
    queries: str = "last"
    next_layer: bool = False

    def prefill_layers(self, geo):
        return (self.layer,)

    def on_prefill_layer(self, ctx, layer):
        self.rows = ctx.attention(self.queries, per_head=True, next_layer=self.next_layer)
        self.slots = ctx.visual_slots()


@pytest.mark.parametrize("next_layer", [False, True])
@pytest.mark.parametrize("queries", ["last", "text"])
def test_rebuilt_query_rows_equal_eager_attention(variant, batch, queries, next_layer):
    _, model, eager, _ = variant
    layer = len(family_for(model).layers) - 2
    probe = Probe(layer=layer, queries=queries, next_layer=next_layer)
    with vistrim.trim(model, probe), torch.no_grad():
        model(**batch)
    with torch.no_grad():
        maps = eager(**batch, output_attentions=True).attentions[layer + next_layer]  # (B, H, T, T)
    visual = visual_mask(model, batch)
    last_visual = torch.where(visual, torch.arange(visual.shape[1]), -1).max(-1).values
    index, valid = probe.slots
    for b in range(maps.shape[0]):
        rows = (
            [maps.shape[2] - 1] if queries == "last" else list(range(int(last_visual[b]) + 1, maps.shape[2]))
        )
        expected = maps[b][:, rows][:, :, index[b][valid[b]]]
        got = probe.rows.probs[b][:, probe.rows.query_valid[b]][:, :, valid[b]]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pdrop_official_renumbers_positions_or_is_refused(variant, batch):
    """The released PyramidDrop rule renumbers positions after each cut (prefill and decoding);
    families with multi-axis positions refuse it in one line, leaving no hook behind."""
    _, model, _, _ = variant
    family = family_for(model)
    if not family.renumber:
        with pytest.raises(vistrim.VistrimError, match="official=true renumbers positions") as info:
            vistrim.apply(model, "pdrop", official=True)
        assert "\n" not in str(info.value) and no_hooks(model)
        return
    seen = []
    with vistrim.trim(model, "pdrop", official=True) as session:
        handle = family.layers[-1].register_forward_pre_hook(
            lambda m, a, k: seen.append(k["position_ids"].clone()), with_kwargs=True
        )
        greedy(model, batch, n=2)
    handle.remove()
    _, live, _ = session.stats.prefill_layers[-1]
    for b in range(live.shape[0]):
        assert seen[0][b][live[b]].tolist() == list(range(int(live[b].sum())))
    assert seen[1][:, 0].tolist() == live.sum(-1).tolist()  # the first new token follows them


@dataclass
class EvictThirds(Method):
    """Evicts every third visual entry from every layer after prefill, another third at a step."""

    name = "evict-thirds"
    step: int = 2

    def decode_layers(self, geo):
        return range(geo.num_layers)

    def _evict(self, ctx, layer, remainder):
        cache_layer = ctx.cache_layer(layer)
        index, valid = cache_layer.visual_slots()
        ctx.evict(layer, ~(valid & (cache_layer.pos.gather(1, index) % 3 == remainder)))

    def on_prefill_end(self, ctx):
        for layer in range(ctx.geometry.num_layers):
            self._evict(ctx, layer, 0)

    def on_decode_layer(self, ctx, layer):
        if ctx.step == self.step:
            self._evict(ctx, layer, 1)


def test_cache_eviction_equals_masked_forward_without_cache(variant, batch):
    """One unpadded sample: decoding logits with evicted cache entries equal a cache-free forward
    over prompt + generated tokens whose masks hide those entries from the step they left."""
    _, model, _, processor = variant
    single = encode(processor, QUESTIONS[1:2])
    steps = 4
    with vistrim.trim(model, EvictThirds(step=2)) as session, torch.no_grad():
        out = model.generate(
            **single,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_len = single["input_ids"].shape[1]
    generated = out.sequences[:, prompt_len:]
    visual = visual_mask(model, single)
    position = torch.arange(prompt_len)[None]
    total = prompt_len + steps
    allowed = torch.ones(total, total, dtype=torch.bool).tril()[None].clone()
    for first_step, remainder in ((0, 0), (3, 1)):
        allowed[:, prompt_len + first_step :, :prompt_len] &= ~(visual & (position % 3 == remainder))[
            :, None, :
        ]
    family = family_for(model)
    eager = family.text_config._attn_implementation == "eager"

    def pre(module, args, kw):
        kw["attention_mask"] = allowed_to_mask(allowed, eager, args[0].dtype)
        return args, kw

    full = dict(single)
    full["input_ids"] = torch.cat([single["input_ids"], generated], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([single["mm_token_type_ids"], torch.zeros_like(generated)], 1)
    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in family.layers]
    try:
        with torch.no_grad():
            reference = model(**full, use_cache=False).logits[:, prompt_len - 1 : total - 1]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(torch.stack(out.logits, 1), reference, atol=1e-5, rtol=0)
    left = int((visual & (position % 3 != 0)).sum())
    assert session.stats.cache_visual_prefill[:, 0].tolist() == [left] * len(family.layers)


# ---------------------------------------------------------------------- a saved folder through the CLI
def test_cli_runs_on_a_saved_folder(variant, tmp_path, capsys):
    from conftest import run_cli

    name, model, _, processor = variant
    folder = tmp_path / name
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = tmp_path / "image.png"
    picture((36, 28), 5).save(image)
    code, out, err = run_cli(
        capsys,
        "run",
        "--model",
        str(folder),
        "--image",
        str(image),
        "--prompt",
        "what color is it ?",
        "--method",
        "fastv",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    assert "layer-averaged visual tokens" in out
    for command, extra in (
        ("eval", ["--limit", "2", "--batch-size", "2"]),
        ("bench", ["--samples", "2", "--repeats", "1", "--max-new-tokens", "2", "--batch-size", "1"]),
    ):
        out_dir = tmp_path / command
        code, out, err = run_cli(
            capsys,
            command,
            "--model",
            str(folder),
            "--methods",
            "fastv",
            "--budgets",
            "0.5",
            "--out",
            str(out_dir),
            *extra,
        )
        assert code == 0, (command, err)
        assert list(out_dir.glob("*.json")) and list(out_dir.glob("*.png")), command
    # bench says what its FLOPs count: the tower only where bench has a formula for it
    settings = json.loads((tmp_path / "bench" / "bench.json").read_text())["settings"]
    tower_counted = family_for(model).flops_shape().vision_layers > 0
    assert ("vision tower" in settings["flops_included"]) == tower_counted
    assert ("decoder layers only" in settings["flops_included"]) != tower_counted


# ---------------------------------------------------------------------- prompts that end with the image
@pytest.mark.parametrize("name", sorted(PRUNING))
@pytest.mark.parametrize("layout", ["ends-with-image", "only-image"])
def test_prompts_where_nothing_follows_the_image(variant, name, layout):
    """Methods that read text queries fall back to the last token; nothing crashes, budgets hold."""
    _, model, _, processor = variant
    token = processor.image_token
    text = f"describe the picture {token}" if layout == "ends-with-image" else token
    inputs = dict(processor(images=[picture((32, 32), 1)], text=[text], return_tensors="pt"))
    settings = {**PRUNING[name], **({"queries": "text"} if name == "st3" else {})}
    with vistrim.trim(model, name, **settings) as session:
        tokens = greedy(model, inputs, n=2)
    assert tokens.shape == (1, 2)
    visual = int(visual_mask(model, inputs).sum())
    counts = session.stats.prefill_visual()[:, 0]
    assert int(counts[0]) == visual and int(counts[-1]) < visual


# ---------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", sorted(PRUNING))
def test_batch_equals_one_by_one(variant, batch, name):
    """The left-padded batch (images of different sizes, one after the text) gives each sample the
    tokens and visual counts it gets alone."""
    _, model, _, processor = variant
    with vistrim.trim(model, name, **PRUNING[name]) as session:
        batched = greedy(model, batch)
        batched_counts = session.stats.prefill_visual()
        for b in range(len(QUESTIONS)):
            alone = greedy(model, encode(processor, QUESTIONS[b : b + 1], first_seed=b))
            assert torch.equal(alone[0], batched[b]), f"sample {b}"
            assert torch.equal(session.stats.prefill_visual()[:, 0], batched_counts[:, b]), f"sample {b}"


def check_rows(model, rows, name: str, settings: dict, processor) -> None:
    """Under ``name``: the batch of ``rows`` equals its masked reference at the surviving tokens, and
    each row alone gets the tokens and visual counts it gets in the batch."""
    inputs = encode_rows(processor, rows)
    with vistrim.trim(model, name, **settings) as session, torch.no_grad():
        logits = model(**inputs).logits
    excluded = excluded_per_layer(session.stats, visual_mask(model, inputs))
    reference = masked_forward(model, inputs, excluded).logits
    compare = inputs["attention_mask"].bool() & ~torch.stack(excluded).any(0)
    torch.testing.assert_close(logits[compare], reference[compare], atol=1e-5, rtol=0)
    with vistrim.trim(model, name, **settings) as session:
        batched = greedy(model, inputs)
        batched_counts = session.stats.prefill_visual()
        for b, row in enumerate(rows):
            alone = greedy(model, encode_rows(processor, [row]))
            assert torch.equal(alone[0], batched[b]), f"sample {b}"
            assert torch.equal(session.stats.prefill_visual()[:, 0], batched_counts[:, b]), f"sample {b}"


# Two images of different sizes in one prompt, beside prompts with one image.
TWO_IMAGES = [
    (0, [("image", (32, 32)), ("text", "and"), ("image", (24, 40)), ("text", "are the shapes the same ?")]),
    (1, [("text", "what color is the shape ?"), ("image", (40, 24))]),
    (2, [("image", (24, 24)), ("image", (32, 24)), ("text", "how many circles ?")]),
]


@pytest.mark.parametrize(("name", "settings"), [("fastv", {"keep": 0.25}), ("pdrop", {})])
def test_two_images_in_one_prompt(variant, name, settings):
    _, model, _, processor = variant
    inputs = encode_rows(processor, TWO_IMAGES)
    with torch.no_grad():
        reference = model(**inputs).logits
    with vistrim.trim(model, "fastv", keep=1.0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    check_rows(model, TWO_IMAGES, name, settings, processor)


# ---------------------------------------------------------------------- videos
# A video with an image in the same prompt, a video alone (an odd frame count: the processor
# repeats the last frame), an image alone.
VIDEOS = [
    (0, [("video", (4, (32, 24))), ("text", "what is in the picture ?"), ("image", (24, 40))]),
    (1, [("text", "describe the picture"), ("video", (3, (24, 24)))]),
    (2, [("image", (32, 32)), ("text", "what color is the shape ?")]),
]


@pytest.fixture(scope="module", params=VIDEO_VARIANTS)
def video_variant(request):
    model, processor = tiny(request.param)
    return model, processor, encode_rows(processor, VIDEOS)


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_video_keep_all_is_identical_to_unpatched(video_variant, name):
    model, _, inputs = video_variant
    with torch.no_grad():
        reference = model(**inputs).logits
    reference_tokens = greedy(model, inputs)
    with vistrim.trim(model, name, **KEEP_ALL[name]):
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = greedy(model, inputs)
    assert torch.equal(logits, reference)
    assert torch.equal(tokens, reference_tokens)
    assert no_hooks(model)


def test_video_tokens_are_trimmed_within_budgets(video_variant):
    model, processor, inputs = video_variant
    ids = inputs["input_ids"]
    video = ids == processor.video_token_id
    assert bool(video[0].any() & video[1].any()) and not bool(video[2].any())
    visual = visual_mask(model, inputs)
    assert torch.equal(visual, video | (ids == processor.image_token_id))
    with vistrim.trim(model, "fastv", layer=2, keep=0.25) as session, torch.no_grad():
        model(**inputs)
    counts = session.stats.prefill_visual()
    assert (counts[2:] == torch.tensor([math.ceil(int(n) * 0.25) for n in visual.sum(-1)])).all()
    kept_video = [int(video[b, kept].sum()) for b, kept in enumerate(session.stats.kept_positions(3))]
    assert kept_video[1] == int(counts[3, 1]) < int(video[1].sum())
    text = inputs["attention_mask"].bool() & ~visual
    for src, live, is_visual in session.stats.prefill_layers:
        for b in range(src.shape[0]):
            assert torch.equal(src[b][live[b] & ~is_visual[b]], text[b].nonzero().flatten())


@pytest.mark.parametrize(
    ("name", "settings"), [("fastv", {"keep": 0.25}), ("st3", {"horizon": 4.0, "every": 1})]
)
def test_video_batch_and_masked_reference(video_variant, name, settings):
    model, processor, _ = video_variant
    check_rows(model, VIDEOS, name, settings, processor)


def test_frames_are_laid_out_as_the_model_reads_a_video(video_variant):
    """A still video (one frame repeated over a temporal patch) is its image: same pixel rows, grid
    and vision features; in a video of two frames each frame fills its own temporal slot."""
    model, processor, _ = video_variant
    first, second = picture((32, 24), 7), picture((32, 24), 8)
    step = processor.video_processor.temporal_patch_size
    image = processor.image_processor([first], return_tensors="pt")
    still = processor.video_processor([[first] * step])
    assert torch.equal(still["pixel_values_videos"], image["pixel_values"])
    assert torch.equal(still["video_grid_thw"], image["image_grid_thw"])
    core = family_for(model).core
    with torch.no_grad():
        video_features = core.get_video_features(still["pixel_values_videos"], still["video_grid_thw"])
        image_features = core.get_image_features(image["pixel_values"], image["image_grid_thw"])
    torch.testing.assert_close(video_features.pooler_output[0], image_features.pooler_output[0])
    moving = processor.video_processor([[first] * (step - 1) + [second]])["pixel_values_videos"]
    pixels = processor.video_processor.patch_size**2
    slots = moving.view(moving.shape[0], -1, step, pixels)  # (cells, channels, time, pixels)
    later = processor.image_processor([second], return_tensors="pt")["pixel_values"].view_as(slots)
    assert torch.equal(slots[:, :, 0], image["pixel_values"].view_as(slots)[:, :, 0])
    assert torch.equal(slots[:, :, -1], later[:, :, -1])


@pytest.mark.parametrize("class_name", sorted(REFUSED))
def test_refused_classes_get_their_reason_in_one_line(class_name):
    model = type(class_name, (torch.nn.Module,), {})()
    with pytest.raises(VistrimError, match=re.escape(REFUSED[class_name])) as error:
        with vistrim.trim(model, "fastv"):
            pass
    assert "\n" not in str(error.value) and class_name in str(error.value)
