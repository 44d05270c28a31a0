"""The trimming runtime: transparency, budgets, equivalence with independent references."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import PROMPTS, encode, greedy, image_token_id, images, no_hooks
from reference import masked_drop_forward, masked_eviction_logits, original_positions

import vistrim
from vistrim.compat import cache_kwargs, output_cache
from vistrim.methods.base import REGISTRY, Method

# Every registered method, with the settings it declares for tests: keeping every token, pruning.
KEEP_ALL = {n: dict(c.keep_all_settings) for n, c in REGISTRY.items() if c.keep_all_settings is not None}
PRUNING = {n: dict(c.pruning_settings or {}) for n, c in REGISTRY.items() if c.keep_all_settings is not None}


def test_every_method_has_test_settings():
    for name, cls in vistrim.list_methods().items():
        assert cls.keep_all_settings is not None, name
        assert cls.pruning_settings is not None or name == "none", name


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_all_is_identical_to_unpatched(tiny, batch, name):
    model, _ = tiny
    with torch.no_grad():
        reference = model(**batch).logits
    reference_tokens = greedy(model, batch)
    with vistrim.trim(model, name, **KEEP_ALL[name]):
        with torch.no_grad():
            logits = model(**batch).logits
        tokens = greedy(model, batch)
    assert torch.equal(logits, reference)
    assert torch.equal(tokens, reference_tokens)


@dataclass
class Exploding(Method):
    name = "exploding"

    def prefill_layers(self, geo):
        return (1,)

    def on_prefill_layer(self, ctx, layer):
        raise RuntimeError("boom inside the forward")


def test_hooks_are_removed_on_exit_and_on_error(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        reference = model(**batch).logits
    with vistrim.trim(model, "fastv", keep=0.25), torch.no_grad():
        model(**batch)
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="boom in the block"):
        with vistrim.trim(model, "pdrop"), torch.no_grad():
            model(**batch)
            raise RuntimeError("boom in the block")
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="boom inside the forward"):
        with vistrim.trim(model, Exploding()), torch.no_grad():
            model(**batch)
    assert no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


def test_apply_remove_and_double_apply(tiny, batch):
    model, _ = tiny
    session = vistrim.apply(model, "fastv", keep=0.5)
    try:
        with pytest.raises(vistrim.VistrimError, match="already trimmed"):
            vistrim.apply(model, "pdrop")
        with torch.no_grad():
            model(**batch)
        assert session.stats.prefill_visual()[-1].tolist() == [32, 32, 32]
    finally:
        vistrim.remove(model)
    assert no_hooks(model)
    vistrim.remove(model)  # a second remove is a no-op


def _text_kept_everywhere(stats, inputs) -> bool:
    real = inputs["attention_mask"].bool()
    text = real & (inputs["input_ids"] != stats_image_token(inputs))
    for src, live, visual in stats.prefill_layers:
        for b in range(src.shape[0]):
            kept_text = src[b][live[b] & ~visual[b]]
            if not torch.equal(kept_text, text[b].nonzero().flatten()):
                return False
    return True


def stats_image_token(inputs) -> int:
    from conftest import image_token_id

    return image_token_id()


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.0, 1.0, 10, 0, 64, 100])
def test_fastv_budget_and_text_kept(tiny, batch, keep):
    model, _ = tiny
    with vistrim.trim(model, "fastv", layer=2, keep=keep) as session, torch.no_grad():
        model(**batch)
    counts = session.stats.prefill_visual()
    expected = math.ceil(keep * 64) if isinstance(keep, float) else min(keep, 64)
    assert (counts[:2] == 64).all() and (counts[2:] == expected).all()
    assert _text_kept_everywhere(session.stats, batch)
    assert session.stats.layer_average_mean() == pytest.approx((2 * 64 + 4 * expected) / 6)


def test_pdrop_and_random_budgets(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "pdrop", stages=4, ratio=0.5) as session, torch.no_grad():
        model(**batch)
    # 6 layers in 4 stages end after layers 1, 2 and 3: 64 -> 32 -> 16 -> 8.
    assert session.stats.prefill_visual()[:, 0].tolist() == [64, 64, 32, 16, 8, 8]
    with vistrim.trim(model, "random", layer=3, keep=20, seed=1) as session, torch.no_grad():
        model(**batch)
    assert session.stats.prefill_visual()[:, 0].tolist() == [64, 64, 64, 20, 20, 20]
    assert _text_kept_everywhere(session.stats, batch)


def test_nesting_kept_sets_shrink(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "pdrop") as session, torch.no_grad():
        model(**batch)
    for layer in range(1, session.stats.num_layers):
        for before, after in zip(
            session.stats.kept_positions(layer - 1), session.stats.kept_positions(layer)
        ):
            assert set(after.tolist()) <= set(before.tolist())


@dataclass
class Probe(Method):
    """Records the attention rows the runtime rebuilds from q and k at one layer."""

    name = "probe"
    layer: int = 1
    queries: str = "last"

    def prefill_layers(self, geo):
        return (self.layer,)

    def decode_layers(self, geo):
        return (self.layer,)

    def on_prefill_layer(self, ctx, layer):
        self.prefill_rows = ctx.attention(self.queries, per_head=True)
        self.prefill_slots = ctx.visual_slots()

    def on_decode_layer(self, ctx, layer):
        if ctx.step == 0:
            self.decode_rows = ctx.attention("last", per_head=True)
            self.decode_slots = ctx.visual_slots(layer)


@pytest.mark.parametrize("layer", [0, 3, 5])
@pytest.mark.parametrize("queries", ["last", "text"])
def test_attention_rows_match_eager(tiny, tiny_eager, batch, layer, queries):
    model, _ = tiny
    eager, _ = tiny_eager
    probe = Probe(layer=layer, queries=queries)
    with vistrim.trim(model, probe), torch.no_grad():
        model(**batch)
    with torch.no_grad():
        maps = eager(**batch, output_attentions=True).attentions[layer]  # (B, H, T, T)
    rows = probe.prefill_rows
    index, valid = probe.prefill_slots
    visual = batch["input_ids"] == image_token_id()
    last_visual = torch.where(visual, torch.arange(visual.shape[1]), -1).max(-1).values
    for b in range(maps.shape[0]):
        query_rows = (
            [maps.shape[2] - 1] if queries == "last" else list(range(int(last_visual[b]) + 1, maps.shape[2]))
        )
        expected = maps[b][:, query_rows][:, :, index[b][valid[b]]]
        got = rows.probs[b][:, rows.query_valid[b]][:, :, valid[b]]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_decode_attention_row_matches_eager(tiny, tiny_eager, batch):
    model, _ = tiny
    eager, _ = tiny_eager
    probe = Probe(layer=2)
    with vistrim.trim(model, probe):
        tokens = greedy(model, batch, n=2)
    extended = {
        "input_ids": torch.cat([batch["input_ids"], tokens[:, :1]], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(tokens[:, :1])], 1),
        "pixel_values": batch["pixel_values"],
    }
    with torch.no_grad():
        maps = eager(
            **extended, position_ids=original_positions(extended["attention_mask"]), output_attentions=True
        )
    row = maps.attentions[2][:, :, -1]  # (B, H, T+1)
    index, valid = probe.decode_slots
    for b in range(row.shape[0]):
        expected = row[b][:, index[b][valid[b]]]
        torch.testing.assert_close(probe.decode_rows.probs[b, :, 0][:, valid[b]], expected, atol=1e-5, rtol=0)


def _excluded_per_layer(stats, inputs) -> list[torch.Tensor]:
    visual = inputs["input_ids"] == image_token_id()
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
        ("fastv", {"keep": 0.25}),
        ("pdrop", {}),
        ("random", {"keep": 7}),
        ("st3", {"vta": False}),
        ("st3", {"vta": False, "queries": "text", "schedule": "cosine", "min_ratio": 0.1}),
    ],
)
def test_dropping_equals_masking_reference(tiny, batch, name, settings):
    model, _ = tiny
    with vistrim.trim(model, name, **settings) as session, torch.no_grad():
        logits = model(**batch).logits
    excluded = _excluded_per_layer(session.stats, batch)
    reference = masked_drop_forward(model, batch, excluded).logits
    compare = batch["attention_mask"].bool() & ~torch.stack(excluded).any(0)
    torch.testing.assert_close(logits[compare], reference[compare], atol=1e-5, rtol=0)
    assert no_hooks(model)


def test_rows_after_a_cut_match_eager_masking_reference(tiny, tiny_eager, batch):
    """Attention rows read at a layer after a cut equal eager attention of the masked reference."""
    model, _ = tiny
    eager, _ = tiny_eager

    @dataclass
    class CutThenProbe(Method):
        name = "cut-then-probe"

        def prefill_layers(self, geo):
            return (1, 3)

        def on_prefill_layer(self, ctx, layer):
            if layer == 1:
                ctx.keep_top(ctx.attention("last").probs[:, 0], ctx.visual_counts() // 2)
            else:
                self.rows, self.slots = ctx.attention("last", per_head=True), ctx.visual_slots()

    method = CutThenProbe()
    with vistrim.trim(model, method) as session, torch.no_grad():
        model(**batch)
    excluded = _excluded_per_layer(session.stats, batch)
    maps = masked_drop_forward(eager, batch, excluded, output_attentions=True).attentions[3]
    index, valid = method.slots
    src = session.stats.prefill_layers[3][0]
    for b in range(maps.shape[0]):
        expected = maps[b][:, -1, src[b][index[b][valid[b]]]]
        torch.testing.assert_close(method.rows.probs[b, :, 0][:, valid[b]], expected, atol=1e-5, rtol=0)


@dataclass
class EvictSame(Method):
    """Evicts the same visual positions from every layer: one set after prefill, one at a step."""

    name = "evict-same"
    step: int = 2

    def decode_layers(self, geo):
        return range(geo.num_layers)

    def _evict_where(self, ctx, layer, remainder):
        cache_layer = ctx.cache_layer(layer)
        index, valid = cache_layer.visual_slots()
        positions = cache_layer.pos.gather(1, index)
        ctx.evict(layer, ~(valid & (positions % 3 == remainder)))

    def on_prefill_end(self, ctx):
        for layer in range(ctx.geometry.num_layers):
            self._evict_where(ctx, layer, 0)

    def on_decode_layer(self, ctx, layer):
        if ctx.step == self.step:
            self._evict_where(ctx, layer, 1)


def test_cache_eviction_equals_masked_forward_without_cache(tiny, batch):
    model, _ = tiny
    steps = 5
    with vistrim.trim(model, EvictSame(step=2)) as session, torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    generated = out.sequences[:, batch["input_ids"].shape[1] :]
    visual = batch["input_ids"] == image_token_id()
    position = torch.arange(visual.shape[1]).expand_as(visual)
    evicted = [(0, visual & (position % 3 == 0)), (3, visual & (position % 3 == 1))]
    reference = masked_eviction_logits(model, batch, generated, evicted)
    torch.testing.assert_close(torch.stack(out.logits, 1), reference, atol=1e-5, rtol=0)
    # the caches really shrank: a third of the visual entries after prefill, two thirds at the end
    n_visual = int(visual[0].sum())
    assert session.stats.cache_visual_prefill[:, 0].tolist() == [n_visual - math.ceil(n_visual / 3)] * 6
    assert session.stats.cache_visual_final[:, 0].tolist() == [n_visual // 3] * 6
    assert session.stats.kv_ratio_final() < session.stats.kv_ratio_prefill() < 1.0


def test_manual_decoding_without_position_ids_continues_original_positions(tiny):
    """A direct forward with a pruned cache and no position ids numbers new tokens from the
    original prompt length, not from the (shorter) cache length, even when layer 0 was pruned."""
    model, processor = tiny
    single = encode(processor, PROMPTS[:1])
    method = EvictSame(step=99)  # evicts a third of the visual entries of every layer after prefill
    with vistrim.trim(model, method), torch.no_grad():
        reference = model.generate(
            **single, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        first = model(**single, use_cache=True)
        assert output_cache(first).get_seq_length() < single["input_ids"].shape[1]
        token = first.logits[:, -1:].argmax(-1)
        second = model(input_ids=token, **cache_kwargs(model, output_cache(first)))
    torch.testing.assert_close(second.logits[:, -1], reference.logits[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(PRUNING))
def test_batch_equals_one_by_one(tiny, batch, name):
    model, processor = tiny
    with vistrim.trim(model, name, **PRUNING[name]) as session:
        batched = greedy(model, batch, n=6)
        batched_counts = session.stats.prefill_visual()
        for b, prompt in enumerate(PROMPTS):
            single = processor(images=images(3)[b : b + 1], text=[prompt], return_tensors="pt")
            alone = greedy(model, single, n=6)
            assert torch.equal(alone[0], batched[b]), f"sample {b}"
            assert torch.equal(session.stats.prefill_visual()[:, 0], batched_counts[:, b])


def test_unequal_visual_counts_in_a_batch(tiny):
    """One prompt with two images beside one with a single image: per-row budgets differ, rows
    are compacted by the common amount and the rest is masked; results equal one-by-one."""
    model, processor = tiny
    prompts = ["USER: <image>\nwhat color ? ASSISTANT:", "USER: <image> and <image>\nsame shape ? ASSISTANT:"]
    pictures = images(3, seed=5)
    batch = processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
    with vistrim.trim(model, "fastv", keep=0.25) as session:
        batched = greedy(model, batch, n=5)
        assert session.stats.prefill_visual()[-1].tolist() == [16, 32]
        first = greedy(model, processor(images=pictures[:1], text=prompts[:1], return_tensors="pt"), n=5)
        second = greedy(model, processor(images=pictures[1:], text=prompts[1:], return_tensors="pt"), n=5)
    assert torch.equal(batched[0], first[0]) and torch.equal(batched[1], second[0])


@pytest.mark.parametrize("name", sorted(PRUNING))
def test_sampling_and_beam_search_run(tiny, batch, name):
    model, _ = tiny
    with vistrim.trim(model, name, **PRUNING[name]) as session, torch.no_grad():
        torch.manual_seed(0)
        sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5)
        beams = model.generate(**batch, max_new_tokens=4, num_beams=3, do_sample=False)
    assert sampled.shape[0] == 3 and beams.shape[0] == 3
    assert session.stats.batch_size == 9  # the last run was beam search: 3 beams per prompt
    assert no_hooks(model)


def test_beam_search_keep_all_is_identical(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
    with vistrim.trim(model, "fastv", keep=1.0), torch.no_grad():
        beams = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(beams, reference)


def test_use_cache_false_forward_returns_no_cache(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "fastv", keep=0.25), torch.no_grad():
        out = model(**batch, use_cache=False)
        cached = model(**batch)
    assert output_cache(out) is None
    torch.testing.assert_close(out.logits, cached.logits, atol=0, rtol=0)


def test_prompt_without_image_is_untouched(tiny):
    model, processor = tiny
    inputs = processor.tokenizer(["USER: what color is the sky ? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
    with vistrim.trim(model, "fastv", keep=0.1), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_kv_bytes_equal_cache_tensor_sizes(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "fastv", keep=0.25) as session, torch.no_grad():
        out = model(**batch)
    cache = output_cache(out)
    sizes = [layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers]
    assert session.stats.kv_bytes_prefill == sizes
    full = batch["input_ids"].shape[1]
    assert session.stats.kv_bytes_unpruned_prefill == [sizes[0] // full * full] * 6
    assert sizes[0] > sizes[-1]


def test_inputs_embeds_with_images_is_refused_not_silently_unpruned(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
    for method in ("fastv", "none"):
        with pytest.raises(vistrim.VistrimError, match="needs input_ids") as info:
            with vistrim.trim(model, method):
                model.generate(
                    inputs_embeds=embeds,
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    max_new_tokens=2,
                )
        assert "\n" not in str(info.value)
        assert no_hooks(model)


def test_stats_of_a_run_without_image_tokens_are_a_valid_empty_summary(tiny):
    model, processor = tiny
    inputs = processor.tokenizer(["what is the color ?"], return_tensors="pt")
    with vistrim.trim(model, "st3") as session:
        assert session.stats.summary()["layer_average_visual"] == 0.0  # before any run
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    summary = session.stats.summary()
    assert summary["visual_in"] == 0.0 and summary["layer_average_visual"] == 0.0
    assert summary["prefill_visual_per_layer"] == [] and summary["batch_size"] == 1
