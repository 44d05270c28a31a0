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
from vistrim.families import family_for
from vistrim.integrations.lmms_eval.base import torchvision_problem
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


def lmms_eval(
    task: Path,
    out: Path,
    model_args: str,
    *extra: str,
    launcher=(sys.executable, "-m"),
    model: str = "vistrim_llava_hf",
    pretrained: str = "testbed",
    task_name: str = "vistrim_easyvqa",
):
    command = [
        *launcher,
        "lmms_eval",
        "--model",
        model,
        "--model_args",
        f"pretrained={pretrained},device=cpu,stats_dir={out / 'stats'},{model_args}",
        "--tasks",
        task_name,
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


def outputs(out: Path, task_name: str = "vistrim_easyvqa") -> tuple[dict, list[dict], list[dict]]:
    """(results JSON, logged samples by doc id, vistrim side-file records of every rank)."""
    (results_file,) = out.glob("results/*/*_results.json")
    (samples_file,) = out.glob(f"results/*/*_samples_{task_name}.jsonl")
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


def answer_one(model, processor, image, question: str) -> tuple[str, int]:
    """vistrim's own greedy answer (as lmms-eval's task asks: 4 new tokens) and the prompt length."""
    inputs = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    length = inputs["input_ids"].shape[1]
    return processor.batch_decode(output[:, length:], skip_special_tokens=True)[0], length


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
                text, length = answer_one(model, processor, load_image(item.image_path), item.question)
                found.append((normalize_answer(text), session.stats.layer_average_mean(), length))
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


def test_shapes_task_exports_test_bed_2_questions_and_scores_them_per_type(tmp_path):
    """`vistrim export-task shapes`: the questions `vistrim eval --data shapes` draws (same subset),
    rendered scenes embedded; lmms-eval answers them as vistrim does and reports every type."""
    from vistrim.data.labelled import labelled_test_items
    from vistrim.data.shapes import QTYPES

    count, folder = 6, tmp_path / "task"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vistrim.cli.main",
            "export-task",
            "shapes",
            "--out",
            str(folder),
            "--limit",
            str(count),
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert run.returncode == 0, run.stderr
    items, _ = labelled_test_items("shapes", count)
    import pandas

    table = pandas.read_parquet(folder / "shapes_test.parquet")
    assert list(table["question"]) == [item.question for item in items]
    assert list(table["answer"]) == [item.answer for item in items]

    model, processor = load_model("testbed")
    expected = [answer_one(model, processor, it.load_image(), it.question)[0] for it in items]
    expected = [normalize_answer(text) for text in expected]

    out = tmp_path / "run"
    out.mkdir()
    run = lmms_eval(folder, out, "method=none", task_name="vistrim_shapes")
    assert run.returncode == 0, run.stderr[-3000:]
    results, samples, _ = outputs(out, "vistrim_shapes")
    assert [normalize_answer(answer_of(s)) for s in samples] == expected
    scores = results["results"]["vistrim_shapes"]
    accuracy = sum(a == normalize_answer(item.answer) for a, item in zip(expected, items)) / count
    assert scores["accuracy,none"] == pytest.approx(accuracy)
    assert {f"accuracy_{qtype},none" for qtype in {item.qtype for item in items}} <= set(scores)
    assert {qtype for qtype in QTYPES} >= {item.qtype for item in items}


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


# ---------------------------------------------------------------------- other families
FAMILY_QUESTIONS = 8  # of the exported 20 (--limit): a tiny random model answers noise, fast


def tiny_variant(name: str):
    """A tiny random model and processor from vistrim's family registry (no hub)."""
    from vistrim.families import FAMILIES

    (build_tiny,) = [b for f in FAMILIES.values() for n, b in f.tiny_variants().items() if n == name]
    return build_tiny(seed=0)


def saved(folder: Path, model, processor, video_processor: str | None = None) -> Path:
    """``model`` and ``processor`` saved as a checkpoint folder; ``video_processor`` names the video
    processor class a hub checkpoint of that family declares (the tiny processors are image-only)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if video_processor is not None:
        (folder / "video_preprocessor_config.json").write_text(
            json.dumps({"video_processor_type": video_processor})
        )
    return folder


def own_answers(model, processor, method, count: int):
    """vistrim's own answers on the first ``count`` exported questions, one by one: (text,
    layer-averaged visual tokens, prompt length, visual tokens in)."""
    torch.set_num_threads(1)
    found = []
    with trim(model, method) as session:
        for item in fixed_subset(load_split("test"), QUESTIONS, seed=0)[:count]:
            text, length = answer_one(model, processor, load_image(item.image_path), item.question)
            stats = session.stats
            found.append((text, stats.layer_average_mean(), length, int(stats.visual_in[0])))
    return found


def check_family_run(out: Path, expected: list, num_layers: int, method) -> dict:
    """A run's files against vistrim's own run of the same questions; returns lmms-eval's throughput."""
    results, samples, side = outputs(out)
    assert [s["doc_id"] for s in samples] == list(range(len(expected)))
    assert [answer_of(s) for s in samples] == [text for text, *_ in expected]
    assert 0 <= results["results"]["vistrim_easyvqa"]["accuracy,none"] <= 1
    throughput = results["throughput"]
    assert throughput["avg_vistrim_samples"] == len(expected) and throughput["avg_vistrim_failed"] == 0
    visual_in = sum(v for *_, v in expected) / len(expected)
    layer_average = sum(a for _, a, _, _ in expected) / len(expected)
    assert throughput["avg_vistrim_visual_tokens_in"] == pytest.approx(visual_in) and visual_in > 0
    assert throughput["avg_vistrim_visual_tokens"] == pytest.approx(layer_average)
    (header,) = [r for r in side if r["kind"] == "run"]
    assert header["method"] == method.name and header["settings"] == method.settings()
    records = sorted((r for r in side if r["kind"] == "sample"), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in records] == list(range(len(expected)))
    for record, (_, average, prompt, n_visual) in zip(records, expected):
        per_layer = record["prefill_visual_per_layer"]
        assert len(per_layer) == num_layers and sum(per_layer) / num_layers == pytest.approx(average)
        assert record["prompt_tokens"] == prompt and record["visual_in"] == n_visual
    if method.name == "none":
        assert layer_average == visual_in and throughput["avg_vistrim_kv_ratio_prefill"] == pytest.approx(1.0)
    else:
        assert layer_average < visual_in and throughput["avg_vistrim_kv_ratio_prefill"] < 1
    return throughput


@pytest.mark.parametrize(
    ("model_args", "method"),
    [("method=none", build("none")), ("method=st3,prune_ratio=0.5", build("st3", prune_ratio=0.5))],
)
def test_llava_hf_serves_llava_next_checkpoints(task, tmp_path, model_args, method):
    """llava_hf loads a LLaVA-NeXT folder by its model_type; trimmed, it answers exactly as vistrim
    answers the same questions (any-resolution tiles, image_sizes) and reports its numbers."""
    model, processor = tiny_variant("llava_next")
    folder = saved(tmp_path / "llava_next", model, processor)
    run = lmms_eval(task, tmp_path, model_args, "--limit", str(FAMILY_QUESTIONS), pretrained=str(folder))
    assert run.returncode == 0, run.stderr[-3000:]
    expected = own_answers(model, processor, method, FAMILY_QUESTIONS)
    check_family_run(tmp_path, expected, family_for(model).geometry.num_layers, method)


TORCHVISION = torchvision_problem()


@pytest.mark.skipif(TORCHVISION is not None, reason=f"torchvision does not import here: {TORCHVISION}")
def test_llava_hf_serves_llava_onevision_checkpoints(task, tmp_path):
    model, processor = tiny_variant("llava_onevision")
    folder = saved(tmp_path / "llava_onevision", model, processor, "LlavaOnevisionVideoProcessor")
    method = build("st3", prune_ratio=0.5)
    run = lmms_eval(
        task, tmp_path, "method=st3,prune_ratio=0.5", "--limit", str(FAMILY_QUESTIONS), pretrained=str(folder)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = own_answers(model, processor, method, FAMILY_QUESTIONS)
    check_family_run(tmp_path, expected, family_for(model).geometry.num_layers, method)


@pytest.mark.skipif(TORCHVISION is None, reason="torchvision imports here (the end-to-end test runs)")
def test_a_checkpoint_llava_hf_cannot_load_stops_with_one_line(task, tmp_path):
    """A LLaVA-OneVision folder without a working torchvision (its video processor needs one): one
    line naming the model, the folder and the cause, exit status 1, before any question."""
    model, processor = tiny_variant("llava_onevision")
    folder = saved(tmp_path / "llava_onevision", model, processor, "LlavaOnevisionVideoProcessor")
    run = lmms_eval(task, tmp_path, "method=st3", "--limit", "2", pretrained=str(folder))
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    wrapped = "lmms_eval.models.chat.llava_hf.LlavaHf"
    prefix = f"vistrim: error: lmms-eval's {wrapped} cannot load pretrained={folder}: "
    assert last.startswith(prefix) and "Torchvision" in last, last
    assert not list(tmp_path.glob("results/*/*_results.json"))


@pytest.mark.skipif(TORCHVISION is None, reason="torchvision imports here (the end-to-end test runs)")
def test_qwen2_5_vl_needs_torchvision_and_says_so_in_one_line():
    from lmms_eval.models import get_model

    with pytest.raises(SystemExit) as raised:
        get_model("vistrim_qwen2_5_vl")
    message = str(raised.value)
    assert (
        message.startswith("vistrim: error: vistrim_qwen2_5_vl needs torchvision") and TORCHVISION in message
    )
    assert len(message.splitlines()) == 1


@pytest.mark.skipif(TORCHVISION is not None, reason=f"torchvision does not import here: {TORCHVISION}")
@pytest.mark.parametrize("model_args", ["method=none", "method=fastv,keep=0.25"])
def test_qwen2_5_vl_end_to_end(task, tmp_path, model_args):
    """lmms-eval's qwen2_5_vl (images through qwen-vl-utils, bf16) on a tiny Qwen2.5-VL: every question
    answered, vistrim's numbers per layer, and the method really ran. Answers are not compared:
    qwen-vl-utils resizes images before the processor does."""
    from lmms_eval.models import get_model
    from transformers import Qwen2VLVideoProcessor

    assert get_model("vistrim_qwen2_5_vl").is_simple is False
    model, processor = tiny_variant("qwen2_5_vl")
    folder = saved(tmp_path / "qwen2_5_vl", model, processor)
    Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2).save_pretrained(folder)
    pixels = "min_pixels=1024,max_pixels=4096"  # lmms-eval's defaults are sized for patch 14
    run = lmms_eval(
        task,
        tmp_path,
        f"{pixels},{model_args}",
        "--limit",
        str(FAMILY_QUESTIONS),
        model="vistrim_qwen2_5_vl",
        pretrained=str(folder),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results, samples, side = outputs(tmp_path)
    assert [s["doc_id"] for s in samples] == list(range(FAMILY_QUESTIONS))
    throughput = results["throughput"]
    assert throughput["avg_vistrim_samples"] == FAMILY_QUESTIONS and throughput["avg_vistrim_failed"] == 0
    visual_in = throughput["avg_vistrim_visual_tokens_in"]
    assert visual_in > 0
    layers = family_for(model).geometry.num_layers
    records = [r for r in side if r["kind"] == "sample"]
    assert sorted(r["doc_id"] for r in records) == list(range(FAMILY_QUESTIONS))
    assert all(len(r["prefill_visual_per_layer"]) == layers for r in records)
    if model_args == "method=none":
        assert throughput["avg_vistrim_visual_tokens"] == visual_in
    else:
        assert throughput["avg_vistrim_visual_tokens"] < visual_in
        assert throughput["avg_vistrim_kv_ratio_prefill"] < 1
