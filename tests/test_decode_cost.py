"""What a decoding step costs the runtime: masks reused across steps equal what transformers'
builder returns, layers that hold the same entries share one mask, a batch-1 run without holes
builds none, and the runtime's and the method's decode time is recorded."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from conftest import PROMPTS, encode, greedy, images

import vistrim
from vistrim.methods.st3 import ST3
from vistrim.models.tiny import build_tiny
from vistrim.runtime.session import extended_mask

# Methods that change a cache while decoding (st3 every step, mustdrop's eviction) and one that
# does not (fastv); positions=renumber also rebuilds rotary embeddings per layer.
DECODING = {
    "fastv": {"keep": 0.25},
    "st3": {"horizon": 6.0, "every": 2},
    "mustdrop": {"budget": 0.3, "decode_evict": True, "decode_beta": 0.02},
    "pdrop": {"official": True},
}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_and_processor(request):
    return build_tiny(seed=0, attn_implementation=request.param)


def count_builds(session) -> list[int]:
    """Wrap the session's mask builder (on the instance) to count decoding builds."""
    calls = [0]
    build = session._build_mask

    def counting(ctx, *args):
        calls[0] += ctx.phase == "decode"
        return build(ctx, *args)

    session._build_mask = counting
    return calls


def decode_masks_checked(model, batch, name: str, steps: int = 6) -> tuple[int, int, int]:
    """Generate ``steps + 1`` tokens with ``name`` and compare every layer's decoding mask with what
    transformers' builder returns for that layer's entries. Returns (builder calls in decoding,
    entry sets new since the previous step, entry sets per step summed)."""
    checked = []
    with vistrim.trim(model, name, **DECODING[name]) as session:
        builds = count_builds(session)
        adapter = session.adapter

        def check(index, module, args, kwargs):
            ctx = session._ctx
            if ctx is None or ctx.phase != "decode":
                return
            layer, hidden = ctx.cache.layers[index], args[0] if args else kwargs["hidden_states"]
            tail = ctx._tail_mask(layer.get_seq_length() - layer.held_prompt + hidden.shape[1])
            pad2d = torch.cat([layer.live, tail], dim=1)
            expected = adapter.causal_mask(ctx.cache, pad2d, hidden, index)
            got = kwargs["attention_mask"]
            assert (got is None and expected is None) or torch.equal(got, expected), (index, ctx.step)
            checked.append((ctx.step, layer.live))  # the tensor itself: ids stay unique

        handles = [
            layer.register_forward_pre_hook(partial(check, i), with_kwargs=True)
            for i, layer in enumerate(adapter.layers)
        ]
        try:
            greedy(model, batch, n=steps + 1)
        finally:
            for handle in handles:
                handle.remove()
    seen = sorted({step for step, _ in checked})
    assert len(checked) == len(seen) * len(adapter.layers) and len(seen) == steps
    held = {step: {id(live): live for s, live in checked if s == step} for step in seen}
    fresh = sum(len(held[s].keys() - held.get(s - 1, {}).keys()) for s in seen)
    return builds[0], fresh, sum(len(h) for h in held.values())


@pytest.mark.parametrize("name", sorted(DECODING))
def test_reused_decode_masks_equal_the_builders(model_and_processor, name):
    model, processor = model_and_processor
    batch = encode(processor, PROMPTS)  # left-padded: every layer needs a mask at every step
    builds, fresh, total = decode_masks_checked(model, batch, name)
    # the builder runs once per step for each set of entries new since the previous step (the
    # first step: all of them); every other layer shares or extends a mask
    assert builds == fresh < total


def test_batch_one_without_holes_builds_no_decode_mask(tiny):
    model, processor = tiny
    single = processor(images=images(1), text=PROMPTS[:1], return_tensors="pt")
    with vistrim.trim(model, "fastv", keep=0.25) as session:
        builds = count_builds(session)
        greedy(model, single, n=5)
    assert builds[0] == 0
    assert session.stats.decode_steps == 4 and session.stats.runtime_seconds_decode > 0
    assert session.stats.hook_seconds_decode == 0  # fastv does nothing while decoding


def test_decode_time_and_peak_kv_are_recorded(tiny, batch):
    model, _ = tiny
    with vistrim.trim(model, "st3", horizon=4.0, every=1) as session:
        greedy(model, batch, n=5)
    stats = session.stats
    assert stats.hook_seconds_decode > 0 and stats.runtime_seconds_decode > 0
    # the first decoding step adds one entry per layer and evicts nothing (st3 re-selects from
    # step 1 on); annealing then shrinks the cache below that peak
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    token = 2 * batch["input_ids"].shape[0] * config.num_key_value_heads * head_dim * 4  # k + v, fp32
    assert stats.kv_bytes_peak == sum(stats.kv_bytes_prefill) + token * config.num_hidden_layers
    assert stats.kv_bytes_peak > sum(stats.kv_bytes_final)
    summary = stats.summary()
    assert summary["kv_bytes_peak"] == stats.kv_bytes_peak and "runtime_seconds_decode" in summary


def test_extended_mask_repeats_the_query_column():
    allowed = torch.tensor([[True, False, True], [True, True, True]])
    four = allowed[:, None, None, :]
    assert torch.equal(extended_mask(four, 4), torch.cat([four, four[..., -1:]], -1))
    assert extended_mask(four, 4)[..., -1].all()
    additive = torch.where(four, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(extended_mask(additive, 4)[..., -1], torch.zeros(2, 1, 1))
    assert torch.equal(extended_mask(allowed, 4)[:, :3], allowed)  # (B, keys) as FlashAttention takes it
    assert extended_mask(four, 5) is None  # not one step later
    assert extended_mask(torch.ones(2, 1, 2, 3, dtype=torch.bool), 4) is None  # two query rows
    assert extended_mask(None, 4) is None


@dataclasses.dataclass
class LayerByLayerST3(ST3):
    """ST3 selecting in each layer's own hook, right after the layer ran (before selection moved to
    the end of the step): the reference for the batched selection."""

    def on_decode_layer(self, ctx, layer: int) -> None:
        step = ctx.step
        if step > 0 and step % self.every == 0 and bool(ctx.cache_layer(layer).row_notes["st3_n0"].any()):
            scores = ctx.attention("last").probs[:, 0]
            ctx.evict_top(layer, scores, self.decode_target(ctx.cache_layer(layer).row_notes["st3_n0"], step))

    def on_decode_end(self, ctx) -> None:
        pass


@pytest.mark.parametrize(
    "settings", [{"horizon": 6.0, "every": 1}, {"horizon": 10.0, "every": 2, "min_keep": 3}]
)
def test_st3_selection_after_the_step_equals_layer_by_layer(tiny, batch, settings):
    model, _ = tiny
    runs = []
    for method in (ST3(**settings), LayerByLayerST3(**settings)):
        with vistrim.trim(model, method) as session:
            tokens = greedy(model, batch, n=8)
        runs.append((tokens, torch.stack(session.stats.decode_visual), session.stats.kv_bytes_final))
    (tokens, visual, final), (reference, reference_visual, reference_final) = runs
    assert (
        torch.equal(tokens, reference) and torch.equal(visual, reference_visual) and final == reference_final
    )
    assert visual[-1].sum() < visual[0].sum()  # it did evict
