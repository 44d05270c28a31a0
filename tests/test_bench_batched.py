"""``vistrim bench --batch 1,8,32 --kv-budget ...``: parsing, the throughput and capacity arithmetic
on injected numbers, batches of different prompts and images, and the JSON of a tiny run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from vistrim.bench.batched import (
    capacity_plan,
    capacity_rows,
    decode_hook_share,
    parse_batches,
    parse_kv_budget,
    throughput_rows,
)
from vistrim.bench.runner import timing_items, workload
from vistrim.data.easyvqa import load_split
from vistrim.errors import VistrimError


# ---------------------------------------------------------------------- parsing
def test_batches_and_kv_budget_parse():
    assert parse_batches("8, 1,32,8") == (1, 8, 32) and parse_batches(4) == (4,)
    assert parse_kv_budget("8x") == ("ratio", 8.0)
    assert parse_kv_budget("512MB") == ("bytes", 512e6)
    assert parse_kv_budget("2GiB") == ("bytes", 2 * 2**30) and parse_kv_budget("1000") == ("bytes", 1000)
    for bad, message in (("0", ">= 1"), ("two", "not an integer"), ("", "empty")):
        with pytest.raises(VistrimError, match=message):
            parse_batches(bad)
    for bad in ("lots", "0x", "8y", "-3MB", "0.5"):
        with pytest.raises(VistrimError, match="bad --kv-budget"):
            parse_kv_budget(bad)


# ---------------------------------------------------------------------- arithmetic
def run(prefill: float, steps: list[float], final: int, peak: int | None = None, hooks=None) -> dict:
    record = {
        "timing": {"prefill": prefill, "steps": steps, "e2e": prefill + sum(steps), "tokens": len(steps) + 1},
        "kv_bytes_final_read": [final // 2, final - final // 2],
    }
    if hooks is not None:  # a trimmed run: hook times, its peak and the statistics of its first repeat
        record.update(hook_seconds_decode=hooks[0], runtime_seconds_decode=hooks[1], kv_bytes_peak=peak)
        record["stats"] = {"kv_bytes_peak": peak}
    return record


CONFIGS = [{"label": "m", "method": "m", "budgets": ["default"]}]


def entry(batch: int, base_steps, method_steps, scale: int = 1) -> dict:
    """Two repeats of the unpruned model and one configuration at ``batch``."""
    base = [run(2.0, base_steps, 1000 * batch * scale) for _ in range(2)]
    method = [
        run(1.0, method_steps, 300 * batch * scale, 500 * batch * scale, (0.01, 0.02)) for _ in range(2)
    ]
    method[1]["timing"]["prefill"] = 0.5
    return {"batch": batch, "timing": {"runs": [base, method]}}


def test_throughput_rows_from_injected_numbers():
    rows = throughput_rows([entry(1, [0.1] * 3, [0.1, 0.08, 0.08]), entry(8, [0.4] * 3, [0.2] * 3)], CONFIGS)
    assert [(r["label"], r["batch"]) for r in rows] == [("unpruned", 1), ("m", 1), ("unpruned", 8), ("m", 8)]
    base8, method8 = rows[2], rows[3]
    assert base8["decode_tokens_per_s"]["median"] == pytest.approx(8 / 0.4)  # batch / median step
    assert method8["decode_tokens_per_s"]["median"] == pytest.approx(8 / 0.2)
    assert method8["throughput_speedup"]["median"] == pytest.approx(2.0)
    assert rows[1]["throughput_speedup"]["median"] == pytest.approx(0.1 / 0.08)  # per-run median step
    assert method8["prefill_speedup"] == {"median": 3.0, "min": 2.0, "max": 4.0}  # 2/1 and 2/0.5, paired
    assert method8["kv_bytes_final_per_sequence"] == 300 and method8["kv_ratio_final"] == pytest.approx(0.3)
    assert method8["kv_bytes_peak_per_sequence"] == 500 and base8["kv_bytes_peak_per_sequence"] == 1000
    assert method8["decode_hook_share"]["median"] == pytest.approx(0.03 / 0.6)
    assert base8["decode_hook_share"] is None
    assert decode_hook_share(run(1.0, [0.5, 0.5], 10, 10, (0.05, 0.05))) == pytest.approx(0.1)


def test_capacity_from_injected_numbers():
    first = entry(1, [0.1] * 3, [0.1] * 3)  # unpruned peak 1000 B per sequence, the method 500
    plan = capacity_plan(first, CONFIGS, ("ratio", 8.0))
    assert plan["budget_bytes"] == 8000 and plan["capacity"] == [8, 16]
    assert plan["capacity_ratio_limit"] == [1.0, 2.0]
    assert capacity_plan(first, CONFIGS, ("bytes", 2999.0))["capacity"] == [2, 5]  # rounded down
    # measured at the capacities: unpruned at 8 (0.4 s per step), the method at 16 (0.5 s per step)
    timing = {
        "runs": [
            entry(8, [0.4] * 3, [0])["timing"]["runs"][0],
            entry(16, [0], [0.5] * 3)["timing"]["runs"][1],
        ]
    }
    base, method = capacity_rows(plan, CONFIGS, timing)
    assert base["capacity_ratio"] == 1.0 and method["capacity_ratio"] == 2.0
    assert base["decode_tokens_per_s"]["median"] == pytest.approx(20.0)
    assert method["decode_tokens_per_s"]["median"] == pytest.approx(32.0)
    assert method["throughput_ratio"]["median"] == pytest.approx(32.0 / 20.0)
    # what the runs at those batches held: 8 x 1000 and 16 x 500 bytes, within the 8000-byte budget
    assert (base["peak_bytes_at_capacity"], method["peak_bytes_at_capacity"]) == (8000, 8000)
    assert base["within_budget"] and method["within_budget"]
    over = capacity_rows({**plan, "budget_bytes": 7999}, CONFIGS, timing)[1]
    assert over["within_budget"] is False
    unmeasured = capacity_rows(plan, CONFIGS, None)[1]
    assert unmeasured["capacity"] == 16 and unmeasured["decode_tokens_per_s"] is None


# ---------------------------------------------------------------------- batches
def test_a_timed_batch_holds_different_prompts_and_images_left_padded(tiny):
    model, processor = tiny
    pool = timing_items(load_split("test"), 50)
    assert len({item.image_path for item in pool}) == 50
    inputs, info = workload(model, processor, pool, 4)
    assert info["batch"] == 4 and len(set(info["questions"])) == 4
    pixels = inputs["pixel_values"].flatten(1)
    assert all(not torch.equal(pixels[i], pixels[j]) for i in range(4) for j in range(i))
    mask = inputs["attention_mask"]
    assert not bool(mask.all())  # prompts of different lengths
    assert bool((mask[:, -1] == 1).all()) and bool((mask.diff(dim=1) >= 0).all())  # padding on the left


SCHEMA = {
    "throughput": [
        "label", "batch", "prefill_s", "prefill_speedup", "decode_tokens_per_s", "throughput_speedup",
        "kv_bytes_final_per_sequence", "kv_bytes_peak_per_sequence", "kv_ratio_final", "decode_hook_share",
    ],
    "capacity": ["label", "capacity", "capacity_ratio", "per_sequence_peak_bytes", "decode_tokens_per_s"],
}  # fmt: skip


def test_bench_batched_on_tiny_writes_throughput_and_capacity(capsys, tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--model", "tiny", "--methods", "fastv", "--budgets", "0.25", "--repeats", "1"]
    argv += ["--batch", "2,1", "--kv-budget", "2x", "--samples", "0", "--new-tokens", "4", "--out", str(out)]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "throughput by batch size" in stdout and "capacity" in stdout
    document = json.loads((out / "bench.json").read_text())
    assert document["settings"]["batches"] == [1, 2] and document["settings"]["kv_budget"] == ["ratio", 2.0]
    rows = document["throughput"]
    assert [(r["label"], r["batch"]) for r in rows] == [
        ("unpruned", 1),
        ("fastv", 1),
        ("unpruned", 2),
        ("fastv", 2),
    ]
    for row in rows:
        assert set(SCHEMA["throughput"]) <= set(row)
        step = row["per_token_s"]["median"]
        assert row["decode_tokens_per_s"]["median"] == pytest.approx(row["batch"] / step)
    assert rows[1]["kv_ratio_final"] < 1 and rows[1]["decode_hook_share"]["median"] >= 0
    capacity = document["capacity"]
    assert capacity["measured_at_batch"] == 2  # per-sequence bytes from the largest batch
    assert capacity["capacity"][0] == 2 and capacity["capacity"][1] > 2  # fastv's smaller cache fits more
    assert capacity["rows"][0]["within_budget"]  # the unpruned model at batch 2 holds exactly 2x
    for row in capacity["rows"]:
        assert set(SCHEMA["capacity"]) <= set(row)
    # the capacity runs ran at those batch sizes, with one sequence per prompt
    runs = document["raw"]["capacity"]["timing"]["runs"]
    workloads = document["raw"]["capacity"]["timing"]["workloads"]
    assert sorted(int(b) for b in workloads) == sorted(set(capacity["capacity_run"]))
    assert len(runs[1][0]["kv_bytes_final_read"]) == 6  # every layer's bytes, read from the cache
    assert document["rows"][0]["identical"] is None  # --samples 0: no answers
    table = (out / "table.md").read_text()
    assert "Throughput by batch size" in table and "Capacity" in table and "dec. hooks" in table
    assert (out / "throughput_vs_batch.png").stat().st_size > 1000
    assert not (out / "accuracy_vs_speedup.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch-size must be >= 1"),
        (["--batch", "1,x"], "'x' is not an integer"),
        (["--kv-budget", "lots"], "bad --kv-budget 'lots'"),
        (["--kv-budget", "0x"], "the multiple must be > 0"),
        (["--samples", "-1"], "--samples must be >= 0"),
    ],
)
def test_bench_batched_bad_input_is_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "bench", "--model", "tiny", *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
