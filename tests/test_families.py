"""Every invariant on every family: a tiny random model of each (built from a config, no hub).

A family enters this matrix by registering itself in ``vistrim.families`` with a ``tiny`` builder;
nothing here names a family, a model class or a token id.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch
from conftest import no_hooks
from PIL import Image
from reference import allowed_to_mask

import vistrim
from vistrim.families import FAMILIES, family_for
from vistrim.methods.base import REGISTRY, Method
from vistrim.methods.scorer import ScorerMethod

VARIANTS = {name: build for family in FAMILIES.values() for name, build in family.tiny_variants().items()}
REQUIRES = {name: family.tiny_requires for family in FAMILIES.values() for name in family.tiny_variants()}

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


def encode(processor, items) -> dict:
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor, q, first) for q, _, first in items]
    pictures = [picture(size, i) for i, (_, size, _) in enumerate(items)]
    return dict(processor(images=pictures, text=texts, return_tensors="pt", padding=True))


def rows_of(inputs: dict, rows: list[int]) -> dict:
    """The inputs of some samples alone (unpadded), as the processor would make them."""
    return inputs["_encode"]([inputs["_items"][r] for r in rows])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    missing = [module for module in REQUIRES[request.param] if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"{request.param}: its tiny builder needs {', '.join(missing)}")
    build = VARIANTS[request.param]
    model, processor = build(seed=0)
    eager, _ = build(seed=0, attn_implementation="eager")
    return request.param, model, eager, processor


@pytest.fixture(scope="module")
def batch(variant):
    _, _, _, processor = variant
    return encode(processor, QUESTIONS)


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
