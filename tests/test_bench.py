"""``vistrim bench``: the FLOPs formula by hand, timing and speed-up arithmetic, KV byte accounting,
the JSON schema and plots of a quick run on the tiny model, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, encode, run_cli

from vistrim import trim
from vistrim.bench.flops import (
    FlopsShape,
    decoder_layer_flops,
    flops_ratio,
    prefill_flops,
    vision_layer_flops,
)
from vistrim.bench.report import aggregate
from vistrim.bench.runner import cache_bytes, unpruned_prefill_bytes
from vistrim.bench.specs import build_configs, parse_budgets, parse_method_specs
from vistrim.bench.timing import spread, timing_from_stamps
from vistrim.compat import output_cache

# d=4, d_kv=2, m=8; tower: d=2, m=4, 2 layers, 4x4 image with 2x2 patches -> 4 patches + CLS.
SHAPE = FlopsShape(
    hidden=4,
    kv_width=2,
    intermediate=8,
    vision_hidden=2,
    vision_intermediate=4,
    vision_layers=2,
    image_size=4,
    patch_size=2,
)


# ---------------------------------------------------------------------- FLOPs by hand
def test_decoder_and_vision_layer_flops_by_hand():
    # n=3: projections 2*3*(2*16 + 2*4*2) = 288, attention 4*9*4 = 144, MLP 6*3*4*8 = 576
    assert decoder_layer_flops(3, 4, 2, 8) == 1008
    # n=1: 2*1*48 = 96, 4*1*4 = 16, 6*1*4*8 = 192
    assert decoder_layer_flops(1, 4, 2, 8) == 304
    # CLIP n=5, d=2, m=4: 2*5*4*4 = 160, 4*25*2 = 200, 2*2*5*2*4 = 160
    assert vision_layer_flops(5, 2, 4) == 520
    # n=3: 2*3*16 = 96, 4*9*2 = 72, 2*2*3*2*4 = 96
    assert vision_layer_flops(3, 2, 4) == 264


def test_prefill_flops_and_ratio_by_hand():
    full = prefill_flops(SHAPE, [3, 3], n_visual=4)
    # patch embedding 2*4 patches*(3 channels*2*2)*2 = 192; two layers on 5 tokens 2*520
    assert full["vision"] == 192 + 1040
    # projector 2*4*(2*4 + 4*4) = 192
    assert full["projector"] == 192
    assert full["decoder"] == 2 * 1008
    assert full["total"] == 2016 + 1232 + 192 == 3440
    pruned = prefill_flops(SHAPE, [3, 1], n_visual=4, vision_tokens=[5, 3])
    assert pruned["decoder"] == 1008 + 304
    assert pruned["vision"] == 192 + 520 + 264
    assert flops_ratio(pruned, full) == pytest.approx((1312 + 976 + 192) / 3440)
    assert prefill_flops(SHAPE, [3, 3], 4, images=2)["vision"] == 2 * 1232


# ---------------------------------------------------------------------- timing arithmetic
def test_timing_from_stamps_and_spread():
    timing = timing_from_stamps(10.0, [10.5, 10.75, 11.0, 11.5], 11.625)
    assert timing.prefill == 0.5 and timing.steps == [0.25, 0.25, 0.5] and timing.tokens == 4
    assert timing.e2e == 1.625
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


def raw_configs(document: dict) -> list[dict]:
    return document["raw"]["configs"]


def fake_raw(base_prefill, method_prefill, layer_tokens) -> dict:
    """Raw records of one configuration on a 2-layer model with a 10-token prompt (4 visual)."""

    def run(prefill, hook=0.0):
        timing = {"prefill": prefill, "steps": [0.1, 0.1], "e2e": prefill + 0.2, "tokens": 3}
        return {"timing": timing, "kv_bytes_final_read": [100, 100], "hook_seconds_prefill": hook}

    stats = {
        "summary": {"layer_average_visual": 2.0, "visual_in": 4, "prefill_visual_per_layer": [4, 0]},
        "layer_tokens": layer_tokens,
        "vision_tokens": None,
        "kv_bytes_prefill": [80, 40],
        "kv_bytes_final": [100, 60],
    }
    method_runs = [run(p, hook=p / 4) for p in method_prefill]
    method_runs[0]["stats"] = stats
    for r in method_runs:
        r["hook_seconds_decode"] = 0.0
        r["kv_bytes_final_read"] = [100, 60]
    no_answers = {"layer_average_visual": 4.0, "fidelity": {"identical": 1.0, "kl_first_token": 0.0}}
    return {
        "workload": {
            "prompt_tokens": [10],
            "visual_tokens": [4],
            "images_per_sample": 1.0,
            "tower_sequences_per_sample": 1.0,
        },
        "configs": [{"label": "m", "method": "m", "budgets": [0.5], "settings": {}}],
        "unpruned_kv_prefill": [80, 80],
        "timing": {"runs": [[run(p) for p in base_prefill], method_runs], "peak_memory": [1, 2]},
        "quality": [no_answers, no_answers],
    }


def test_aggregate_pairs_repeats_and_computes_efficiency():
    raw = fake_raw([2.0, 4.0, 2.0], [1.0, 1.0, 2.0], layer_tokens=[10, 6])
    base, row = aggregate(raw, SHAPE, num_layers=2)
    # paired speed-ups 2, 4, 1 -> median 2 (unpaired medians would give 2/1 as well, min/max differ)
    assert row["speedup"]["prefill"] == {"median": 2.0, "min": 1.0, "max": 4.0}
    expected = prefill_flops(SHAPE, [10, 6], 4)["total"] / prefill_flops(SHAPE, [10, 10], 4)["total"]
    assert row["flops_ratio"] == pytest.approx(expected)
    assert row["realisation_efficiency"] == pytest.approx(2.0 * expected)
    assert row["kv_ratio_prefill"] == 120 / 160 and row["kv_ratio_final"] == 160 / 200
    assert row["overhead"]["median"] == pytest.approx(0.25)
    assert base["speedup"]["prefill"]["median"] == 1.0 and base["flops_ratio"] == 1.0


# ---------------------------------------------------------------------- KV bytes
def tensor_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_bytes_equal_the_cache_tensors(tiny):
    model, processor = tiny
    inputs = encode(processor, PROMPTS[:2])
    with trim(model, "fastv", keep=0.25) as session, torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
    assert (
        sum(session.stats.kv_bytes_final)
        == sum(cache_bytes(output_cache(out)))
        == tensor_bytes(output_cache(out))
    )
    assert sum(session.stats.kv_bytes_prefill) < sum(session.stats.kv_bytes_unpruned_prefill)
    # plain model after prefill: keys and values, every layer, every (padded) position, fp32
    config = model.config.text_config
    batch, length = inputs["input_ids"].shape
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * length * head_dim * 4
    assert sum(unpruned_prefill_bytes(model, inputs)) == expected


# ---------------------------------------------------------------------- specs and budgets
def test_method_specs_keep_commas_inside_settings():
    specs = parse_method_specs("st3:schedule=step;steps=8:0.5,16:0.25,fastv:layer=3,random")
    assert [s.name for s in specs] == ["st3", "fastv", "random"]
    assert specs[0].settings == {"schedule": "step", "steps": "8:0.5,16:0.25"}
    assert specs[1].settings == {"layer": "3"}
    assert parse_budgets("0.5, 64,default") == [0.5, 64, "default"]


def test_configs_merge_identical_settings_and_hit_budgets():
    specs = parse_method_specs("none,fastv,pdrop")
    configs = build_configs(specs, [0.5, 48], n_visual=64, num_layers=6)
    assert (configs[0].label, configs[0].budgets) == ("none", ["-"])  # none ignores budgets: one row
    fastv = [c for c in configs if c.name == "fastv"]
    assert [c.method.keep for c in fastv] == [16, 40]  # (32*6 - 2*64) / 4 and (48*6 - 128) / 4
    st3 = parse_method_specs("st3")
    assert [c.budgets for c in build_configs(st3, [0.5], 64, 6)] == [[0.5], ["default"]]
    assert [c.budgets for c in build_configs(st3, [0.5], 64, 6, own_defaults=False)] == [[0.5]]


# ---------------------------------------------------------------------- the command
SCHEMA = {
    "settings": [
        "model", "device", "dtype", "attention", "torch", "transformers", "vistrim", "cpu", "torch_threads",
        "budgets", "methods", "samples", "options", "flops_included", "peak_memory_note", "geometry",
        "load_average",
    ],
    "row": [
        "label", "method", "budgets", "settings", "layer_average_visual", "prefill_s", "per_token_s", "e2e_s",
        "speedup", "flops", "flops_ratio", "realisation_efficiency", "kv_bytes_prefill", "kv_bytes_final",
        "kv_ratio_prefill", "kv_ratio_final", "overhead", "peak_memory_bytes", "identical", "kl_first_token",
    ],
}  # fmt: skip


def test_bench_on_the_testbed_points_to_testbed2_for_a_ranking(capsys, tmp_path):
    """The README's main job measures accuracy on a test-bed that cannot rank the methods: it says
    so and names the command that can (test-bed 2); other models do not get that line."""
    argv = ["bench", "--methods", "fastv", "--budgets", "0.5", "--repeats", "1", "--samples", "3"]
    code, stdout, err = run_cli(capsys, *argv, "--new-tokens", "2", "--out", str(tmp_path / "bench"))
    assert code == 0, err
    assert "vistrim bench --model testbed2" in " ".join(stdout.split())
    code, stdout, err = run_cli(capsys, *argv, "--model", "tiny", "--out", str(tmp_path / "tiny"))
    assert code == 0, err
    assert "testbed2" not in stdout


def test_bench_quick_on_tiny_writes_table_json_and_plots(capsys, tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--model", "tiny", "--quick", "--methods", "fastv,st3", "--samples", "3"]
    code, stdout, err = run_cli(capsys, *argv, "--new-tokens", "5", "--out", str(out))
    assert code == 0, err
    assert "unpruned" in stdout and "fastv" in stdout and "prefill x" in stdout
    document = json.loads((out / "bench.json").read_text())
    assert set(SCHEMA["settings"]) <= set(document["settings"])
    rows = document["rows"]
    # unpruned, then fastv and st3 at 0.33 and 0.11 (on 6 layers budget mode moves the cut to layer 1)
    assert [r["label"] for r in rows] == ["unpruned", "fastv", "fastv", "st3", "st3"]
    for row in rows:
        assert set(SCHEMA["row"]) <= set(row), set(SCHEMA["row"]) - set(row)
    assert rows[1]["settings"] == {"layer": 1, "keep": 13, "rounding": "ceil"} and rows[4]["budgets"] == [
        0.11
    ]
    assert [entry["name"] for entry in raw_configs(document)[0]["settings_schema"]] == [
        "layer",
        "keep",
        "rounding",
    ]
    assert rows[2]["settings"] == {"layer": 1, "keep": 0, "rounding": "ceil"}
    runs = document["raw"]["timing"]["runs"]
    assert len(runs) == len(rows) and all(len(r) == 2 for r in runs)  # --quick: two repeats
    assert all(len(run["timing"]["steps"]) == 4 for config in runs for run in config)
    assert rows[1]["layer_average_visual"] == pytest.approx((64 + 13 * 5) / 6)
    assert rows[2]["layer_average_visual"] == pytest.approx(64 / 6)
    assert rows[1]["flops_ratio"] < 1 and rows[1]["kv_ratio_prefill"] < 1
    assert (out / "table.md").read_text().count("\n| ") == len(rows) + 1  # header + one line per row
    assert (out / "speedup_vs_budget.png").stat().st_size > 1000
    assert (out / "accuracy_vs_speedup.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "fastv,nosuch"], "unknown method 'nosuch'"),
        (["--methods", "fastv:keep"], "settings are key=value"),
        (["--methods", "fastv:keep=lots"], "fastv.keep"),
        (["--budgets", "abc"], "bad budget 'abc'"),
        (["--budgets", "1.5"], "bad budget '1.5'"),
        (["--budgets", "0"], "bad budget '0'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--new-tokens", "1"], "--max-new-tokens must be >= 2"),
        (["--methods", "fastv", "--set", "pdrop.ratio=0.5"], "'pdrop' is not among the selected methods"),
        (["--methods", "fastv", "--set", "nosuch=1"], "no selected method has a setting 'nosuch'"),
        (["--methods", "fastv", "--set", "fastv.kep=1"], "did you mean 'keep'"),
        (["--methods", "fastv,random", "--set", "keep=lots"], "fastv.keep"),
    ],
)
def test_bench_bad_input_is_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "bench", "--model", "tiny", *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bench_is_callable_from_python(tiny, tmp_path):
    from vistrim.bench.suite import BenchPlan, bench, write_outputs

    model, processor = tiny
    plan = BenchPlan.resolve("tiny", budgets="0.5", repeats=1, max_new_tokens=2, samples=2)
    document, rows = bench(model, processor, "fastv", plan)
    assert [r["label"] for r in rows] == ["unpruned", "fastv"] and rows[1]["budgets"] == [0.5]
    assert document["settings"]["options"]["repeats"] == 1
    write_outputs(document, rows, plan, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["rows"][1]["label"] == "fastv"
