"""Pure tensor functions and the tracked cache layer, on hand-made tensors."""

from __future__ import annotations

import torch

from vistrim.ops.attention import attention_probs, grouped_logits
from vistrim.ops.compact import gather_rows, removal_index
from vistrim.ops.select import budget_counts, ratio_count, topk_mask
from vistrim.runtime.cache import TrackedLayer, visual_slots


def test_grouped_logits_match_repeated_heads():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 3, 4)
    k = torch.randn(2, 2, 5, 4)
    repeated = k.repeat_interleave(3, dim=1)  # what repeat_kv does: head h reads kv head h // 3
    expected = q @ repeated.transpose(-1, -2) * 0.5
    torch.testing.assert_close(grouped_logits(q, k, 0.5), expected)


def test_attention_probs_masking_and_empty_rows():
    q = torch.zeros(1, 1, 2, 2)
    k = torch.zeros(1, 1, 3, 2)
    allowed = torch.tensor([[[True, True, False], [False, False, False]]])
    probs = attention_probs(q, k, 1.0, allowed)
    assert probs[0, 0, 0].tolist() == [0.5, 0.5, 0.0]
    assert probs[0, 0, 1].tolist() == [0.0, 0.0, 0.0]  # no allowed key -> zeros, not NaN


def test_budget_counts_ratio_and_count():
    available = torch.tensor([10, 64, 3])
    assert budget_counts(0.25, available).tolist() == [3, 16, 1]
    assert budget_counts(0.3, torch.tensor([10])).tolist() == [3]  # float noise does not round up
    assert budget_counts(5, available).tolist() == [5, 5, 3]
    assert budget_counts(0.0, available).tolist() == [0, 0, 0]
    assert budget_counts(1.0, available).tolist() == [10, 64, 3]
    assert ratio_count(0.3, 10) == 3 and ratio_count(0.31, 10) == 4


def test_topk_mask_respects_counts_validity_and_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [False, True, True, True]])
    keep = topk_mask(scores, torch.tensor([2, 5]), valid)
    assert keep[0].tolist() == [False, True, False, True]
    assert keep[1].tolist() == [False, True, True, True]  # invalid never kept, count capped
    tie = topk_mask(torch.zeros(1, 4), torch.tensor([2]))
    assert tie[0].tolist() == [True, True, False, False]  # ties go to the earlier index


def test_removal_index_removes_common_amount_in_order():
    removable = torch.tensor([[False, True, True, False, True], [True, False, False, True, False]])
    index = removal_index(removable)
    # row 0 can drop 3, row 1 only 2: both drop 2 (their first two removable entries)
    assert index.tolist() == [[0, 3, 4], [1, 2, 4]]
    assert removal_index(torch.zeros(2, 3, dtype=torch.bool)) is None


def test_gather_rows_along_any_dim():
    x = torch.arange(2 * 3 * 4).view(2, 3, 4)
    index = torch.tensor([[2, 0], [1, 1]])
    assert gather_rows(x, index, 1).tolist() == [[x[0, 2].tolist(), x[0, 0].tolist()], [x[1, 1].tolist()] * 2]
    assert gather_rows(x, index, 2)[1, 0].tolist() == [13, 13]


def test_visual_slots_pad_rows_and_mark_dead():
    visual = torch.tensor([[False, True, True, False], [True, False, False, False]])
    live = torch.tensor([[True, True, False, True], [True, True, True, True]])
    index, valid = visual_slots(visual, live)
    assert index[0].tolist() == [1, 2] and valid[0].tolist() == [True, False]
    assert index[1, 0].item() == 0 and valid[1].tolist() == [True, False]


def _layer(batch=2, prompt=4, generated=1):
    layer = TrackedLayer()
    keys = torch.arange(batch * (prompt + generated), dtype=torch.float32).view(batch, 1, -1, 1)
    layer.update(keys, keys + 100)
    pos = torch.arange(prompt).expand(batch, prompt)
    visual = torch.tensor([[False, True, True, False]] * batch)
    layer.describe_prompt(prompt, pos, torch.ones(batch, prompt, dtype=torch.bool), visual, True)
    return layer


def test_tracked_layer_drop_frees_memory_and_keeps_generated():
    layer = _layer()
    layer.entry_notes["score"] = torch.arange(8.0).view(2, 4)
    dead = torch.tensor([[False, True, False, False], [False, False, True, False]])
    layer.drop(dead)
    assert layer.keys.shape[2] == 4  # one prompt entry removed from each row, generated kept
    assert layer.pos.tolist() == [[0, 2, 3], [0, 1, 3]]
    assert layer.keys[0, 0, :, 0].tolist() == [0, 2, 3, 4] and layer.values[1, 0, :, 0].tolist() == [
        105,
        106,
        108,
        109,
    ]
    assert layer.generated == 1 and layer.all_live
    assert layer.entry_notes["score"].tolist() == [[0, 2, 3], [4, 5, 7]]


def test_tracked_layer_row_operations_move_bookkeeping():
    layer = _layer()
    layer.drop(torch.tensor([[False, True, False, False], [False, False, False, False]]))
    assert not layer.all_live  # row 1 could not drop anything yet: row 0's drop is a masked hole
    layer.entry_notes["score"] = torch.rand(layer.pos.shape)
    layer.row_notes["n0"] = torch.tensor([7, 9])
    before = [t.clone() for t in (layer.pos, layer.live, layer.keys, layer.entry_notes["score"])]
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.pos, before[0].flip(0)) and torch.equal(layer.live, before[1].flip(0))
    assert torch.equal(layer.keys, before[2].flip(0)) and torch.equal(
        layer.entry_notes["score"], before[3].flip(0)
    )
    assert layer.row_notes["n0"].tolist() == [9, 7]
    layer.batch_repeat_interleave(2)
    assert layer.pos.shape[0] == 4 and layer.keys.shape[0] == 4
    layer.batch_select_indices(torch.tensor([3]))
    assert torch.equal(layer.live[0], before[1][0])


def test_tracked_layer_crop_only_generated():
    import pytest

    from vistrim.errors import VistrimError

    layer = _layer(generated=2)
    layer.crop(-1)
    assert layer.generated == 1
    with pytest.raises(VistrimError, match="crop"):
        layer.crop(-3)
