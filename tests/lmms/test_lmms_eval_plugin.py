"""The lmms-eval plugin end to end, as users launch it: ``python -m lmms_eval`` and ``accelerate
launch`` on the shipped test-bed and a local easy-vqa task (20 questions), offline on CPU.

lmms-eval exits 0 even when an evaluation fails, so every check reads the files a run writes:
the results JSON (accuracy, vistrim's numbers under ``throughput``), the per-sample log (answers,
token counts) and vistrim's per-rank side files; the references are computed here with vistrim
itself on the same questions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vistrim import VistrimError, apply, at_budget, build, trim
from vistrim.data.easyvqa import build_prompt, fixed_subset, load_image, load_split, normalize_answer
from vistrim.models import load_model

QUESTIONS = 20
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("task")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vistrim.cli.main",
            "export-task",
            "easyvqa",
            "--out",
            str(folder),
            "--limit",
            str(QUESTIONS),
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert (folder / "vistrim_easyvqa.yaml").is_file() and (folder / "easyvqa_test.parquet").is_file()
    return folder


def lmms_eval(task: Path, out: Path, model_args: str, *extra: str, launcher=(sys.executable, "-m")):
    command = [
        *launcher,
        "lmms_eval",
        "--model",
        "vistrim_llava_hf",
        "--model_args",
        f"pretrained=testbed,device=cpu,stats_dir={out / 'stats'},{model_args}",
        "--tasks",
        "vistrim_easyvqa",
        "--include_path",
        str(task),
        "--batch_size",
        "1",
        "--output_path",
        str(out / "results"),
        "--log_samples",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=out, timeout=600)


def outputs(out: Path) -> tuple[dict, list[dict], list[dict]]:
    """(results JSON, logged samples by doc id, vistrim side-file records of every rank)."""
    (results_file,) = out.glob("results/*/*_results.json")
    (samples_file,) = out.glob("results/*/*_samples_vistrim_easyvqa.jsonl")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    side = [
        json.loads(line)
        for path in sorted((out / "stats").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    return json.loads(results_file.read_text()), samples, side


def answer_of(sample: dict) -> str:
    response = sample["filtered_resps"]  # a string, or a list of one per repeat
    return response if isinstance(response, str) else response[0]


@pytest.fixture(scope="module")
def reference():
    """vistrim's own answers on the exported questions, one by one, per method."""
    torch.set_num_threads(1)
    model, processor = load_model("testbed")
    items = fixed_subset(load_split("test"), QUESTIONS, seed=0)

    def answers(method):
        found = []
        with trim(model, method) as session:
            for item in items:
                inputs = processor(
                    images=[load_image(item.image_path)],
                    text=[build_prompt(processor, item.question)],
                    return_tensors="pt",
                )
                with torch.no_grad():
                    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
                text = processor.batch_decode(
                    output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )[0]
                found.append(
                    (normalize_answer(text), session.stats.layer_average_mean(), inputs["input_ids"].shape[1])
                )
        return found

    return items, answers


@pytest.mark.parametrize(
    ("model_args", "method"),
    [
        ("method=none", build("none")),
        # a layer-averaged budget: vistrim.at_budget configures ST3 for the prompt's 144 visual tokens
        ("method=st3,budget=0.25", at_budget("st3", 0.25, n_visual=144, num_layers=8)),
    ],
)
def test_plugin_matches_vistrim_and_reports_its_numbers(task, tmp_path, reference, model_args, method):
    run = lmms_eval(task, tmp_path, model_args)
    assert run.returncode == 0, run.stderr[-3000:]
    results, samples, side = outputs(tmp_path)
    items, answers = reference
    expected = answers(method)

    # every question answered, and exactly as vistrim answers it
    assert [s["doc_id"] for s in samples] == list(range(QUESTIONS))
    assert [normalize_answer(answer_of(s)) for s in samples] == [a for a, _, _ in expected]
    accuracy = sum(a == normalize_answer(item.answer) for (a, _, _), item in zip(expected, items)) / QUESTIONS
    assert results["results"]["vistrim_easyvqa"]["accuracy,none"] == pytest.approx(accuracy)

    # vistrim's numbers in lmms-eval's results: layer-averaged visual tokens and KV ratios
    throughput = results["throughput"]
    layer_average = sum(t for _, t, _ in expected) / QUESTIONS
    assert throughput["avg_vistrim_samples"] == QUESTIONS and throughput["avg_vistrim_failed"] == 0
    assert throughput["avg_vistrim_visual_tokens"] == pytest.approx(layer_average)
    assert throughput["avg_vistrim_visual_tokens_in"] == 144
    if method.name == "none":
        assert layer_average == 144 and throughput["avg_vistrim_kv_ratio_prefill"] == pytest.approx(1.0)
    else:
        assert layer_average == pytest.approx(0.25 * 144, abs=1)  # the budget, within a token
        assert throughput["avg_vistrim_kv_ratio_prefill"] < 0.5 and throughput["avg_vistrim_hook_ms"] > 0

    # the effective input tokens (text + layer-averaged visual) in lmms-eval's token counts
    for sample, (_, average, prompt) in zip(samples, expected):
        assert sample["token_counts"][0]["input_tokens"] == round(prompt - 144 + average)

    # the side file: the run's full settings, then one record per question with per-layer statistics
    (header,) = [r for r in side if r["kind"] == "run"]
    assert header["method"] == method.name and header["world_size"] == 1
    records = [r for r in side if r["kind"] == "sample"]
    assert sorted(r["doc_id"] for r in records) == list(range(QUESTIONS))
    for record, (_, average, prompt) in zip(sorted(records, key=lambda r: r["doc_id"]), expected):
        per_layer = record["prefill_visual_per_layer"]
        assert len(per_layer) == 8 and sum(per_layer) / 8 == pytest.approx(record["layer_average_visual"])
        assert record["layer_average_visual"] == pytest.approx(average) and record["prompt_tokens"] == prompt
        assert record.get("settings", header["settings"]) == method.settings()  # what ran, per sample


def test_data_parallel_two_processes_gather_every_question(task, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 runs on CPU with gloo: each rank answers half
    the questions, lmms-eval gathers all of them, and vistrim's numbers cover both ranks."""
    launcher = (
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29533",
        "-m",
    )
    run = lmms_eval(task, tmp_path, "method=fastv,keep=0.25", launcher=launcher)
    assert run.returncode == 0, run.stderr[-3000:]
    results, samples, side = outputs(tmp_path)
    assert [s["doc_id"] for s in samples] == list(range(QUESTIONS))
    files = sorted(p.name for p in (tmp_path / "stats").glob("*.jsonl"))
    assert files == ["vistrim-fastv-rank0-of-2.jsonl", "vistrim-fastv-rank1-of-2.jsonl"]
    by_rank = [
        [json.loads(line) for line in (tmp_path / "stats" / name).read_text().splitlines()[1:]]
        for name in files
    ]
    assert [len(records) for records in by_rank] == [QUESTIONS // 2] * 2
    assert sorted(r["doc_id"] for records in by_rank for r in records) == list(range(QUESTIONS))
    throughput = results["throughput"]
    assert throughput["avg_vistrim_samples"] == QUESTIONS
    records = [r for r in side if r["kind"] == "sample"]
    assert throughput["avg_vistrim_visual_tokens"] == pytest.approx(
        sum(r["layer_average_visual"] for r in records) / QUESTIONS
    )


def test_bad_settings_stop_with_one_line_before_any_question():
    """Through lmms-eval's own registry (the entry point): a chat model, and bad settings raise
    vistrim's one-line error as SystemExit, which lmms-eval's command line does not swallow (the
    subprocess test below shows the exit status)."""
    from lmms_eval.models import get_model

    model_class = get_model("vistrim_llava_hf")
    assert model_class.is_simple is False
    testbed, _ = load_model("testbed")

    def vistrim_error(call) -> str:  # the one-line error vistrim itself gives
        with pytest.raises(VistrimError) as raised:
            call()
        return str(raised.value)

    for model_args, message in (
        ("method=fastv,keep=2.5", vistrim_error(lambda: build("fastv", keep=2.5))),
        ("method=fastv,keeep=0.5", vistrim_error(lambda: build("fastv", keeep=0.5))),
        ("method=nope", vistrim_error(lambda: build("nope"))),
        ("method=fastv,layer=9", vistrim_error(lambda: apply(testbed, "fastv", layer=9))),  # after loading
        ("method=fastv,on_error=ignore", "on_error='ignore' must be raise or record"),
    ):
        with pytest.raises(SystemExit) as raised:
            model_class.create_from_arg_string(f"pretrained=testbed,device=cpu,{model_args}")
        assert str(raised.value) == f"vistrim: error: {message}"
        assert len(message.splitlines()) == 1


def test_failed_generation_stops_the_run_instead_of_an_empty_answer(task, tmp_path):
    """llava_hf records an empty answer when generate raises; the plugin stops with the error."""
    run = lmms_eval(task, tmp_path, "method=st3", "--limit", "2", "--gen_kwargs", "max_new_tokens=-1")
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("vistrim: error: generation failed on vistrim_easyvqa doc 0: ValueError:"), last
    assert not list(tmp_path.glob("results/*/*_results.json"))


def test_on_error_record_keeps_lmms_evals_empty_answers_and_counts_them(task, tmp_path, monkeypatch):
    """on_error=record: lmms-eval's behaviour (an empty answer per failed question, the run goes
    on), with the failures counted in vistrim's numbers. In-process: lmms-eval is imported already."""
    from lmms_eval.__main__ import cli_evaluate

    monkeypatch.chdir(tmp_path)
    model_args = f"pretrained=testbed,device=cpu,method=fastv,on_error=record,stats_dir={tmp_path / 'stats'}"
    argv = ["lmms_eval", "--model", "vistrim_llava_hf", "--model_args", model_args]
    argv += ["--tasks", "vistrim_easyvqa", "--include_path", str(task), "--limit", "3"]
    argv += ["--gen_kwargs", "max_new_tokens=-1"]
    argv += ["--output_path", str(tmp_path / "results"), "--log_samples"]
    monkeypatch.setattr(sys, "argv", argv)
    cli_evaluate()
    results, samples, side = outputs(tmp_path)
    assert [answer_of(s) for s in samples] == ["", "", ""]
    assert results["results"]["vistrim_easyvqa"]["accuracy,none"] == 0
    throughput = results["throughput"]
    assert throughput["avg_vistrim_failed"] == 3 and throughput["avg_vistrim_samples"] == 0
    assert [r["kind"] for r in side] == ["run"]  # no statistics for questions that were not answered
