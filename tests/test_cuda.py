"""The runtime's invariants on a CUDA device, every family, SDPA and FlashAttention-2 when importable.

Skipped without CUDA (CI has none); ``scripts/gpu_check.sh`` runs them on a GPU machine with
``pytest -m cuda``. float32 checks equivalences at the CPU tolerances, bfloat16 that keep-all stays
bit-identical and that pruned runs are close to the masked reference.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_families import (
    KEEP_ALL,
    PRUNING,
    QUESTIONS,
    REQUIRES,
    VARIANTS,
    encode,
    excluded_per_layer,
    greedy,
    masked_forward,
    visual_mask,
)

import vistrim

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]
BACKENDS = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def on_cuda(inputs: dict, dtype) -> dict:
    out = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in out:
            out[key] = out[key].to(dtype)
    return out


@pytest.fixture(
    scope="module",
    params=[(v, b, d) for v in sorted(VARIANTS) for b in BACKENDS for d in ("float32", "bfloat16")],
)
def cuda_variant(request):
    name, backend, dtype = request.param
    if backend.startswith("flash") and dtype == "float32":
        pytest.skip("FlashAttention needs half precision")
    missing = [module for module in REQUIRES[name] if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"{name}: its tiny builder needs {', '.join(missing)}")
    model, processor = VARIANTS[name](seed=0, attn_implementation=backend)
    dtype = getattr(torch, dtype)
    model = model.to("cuda", dtype)
    return name, model, processor, dtype


@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_all_is_identical_on_cuda(cuda_variant, method):
    _, model, processor, dtype = cuda_variant
    batch = on_cuda(encode(processor, QUESTIONS), dtype)
    with torch.no_grad():
        reference = model(**batch).logits
    tokens = greedy(model, batch)
    with vistrim.trim(model, method, **KEEP_ALL[method]), torch.no_grad():
        logits = model(**batch).logits
        trimmed = greedy(model, batch)
    assert torch.equal(logits, reference)
    assert torch.equal(trimmed, tokens)


@pytest.mark.parametrize("method", ["fastv", "pdrop", "random"])
def test_physical_drop_close_to_masked_reference_on_cuda(cuda_variant, method):
    _, model, processor, dtype = cuda_variant
    if model.config.text_config._attn_implementation.startswith("flash"):
        pytest.skip("the masked reference needs a 4-D mask, which FlashAttention does not take")
    batch = on_cuda(encode(processor, QUESTIONS), dtype)
    with vistrim.trim(model, method, **PRUNING[method]) as session, torch.no_grad():
        logits = model(**batch).logits
    excluded = excluded_per_layer(session.stats, visual_mask(model, batch))
    reference = masked_forward(model, batch, excluded).logits
    compare = batch["attention_mask"].bool() & ~torch.stack(excluded).any(0)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits[compare].float(), reference[compare].float(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("method", sorted(PRUNING))
def test_batch_equals_one_by_one_on_cuda(cuda_variant, method):
    _, model, processor, dtype = cuda_variant
    batch = on_cuda(encode(processor, QUESTIONS), dtype)
    with vistrim.trim(model, method, **PRUNING[method]) as session:
        greedy(model, batch, n=3)
    counts = session.stats.prefill_visual()
    for row, item in enumerate(QUESTIONS):
        with vistrim.trim(model, method, **PRUNING[method]) as alone:
            greedy(model, on_cuda(encode(processor, [item]), dtype), n=3)
        assert torch.equal(alone.stats.prefill_visual()[:, 0], counts[:, row])


@pytest.mark.parametrize("method", ["fastv", "st3", "mustdrop"])
def test_reused_decode_masks_equal_the_builders_on_cuda(cuda_variant, method):
    """Every backend's mask format (FlashAttention: (B, keys); SDPA: 4-D) extended across steps."""
    from test_decode_cost import decode_masks_checked

    name, model, processor, dtype = cuda_variant
    if name != "llava":
        pytest.skip("one family is enough for the mask formats")
    builds, fresh, total = decode_masks_checked(model, on_cuda(encode(processor, QUESTIONS), dtype), method)
    assert builds == fresh < total
