"""The local lmms-eval task ``vistrim_easyvqa``: easy-vqa test questions scored as ``vistrim eval``
scores them (the first word of the answer, lower-cased, must be the label).

``export_easyvqa`` writes the questions (a fixed seeded subset, the one ``vistrim eval`` draws for
the same count and seed) with their images to one parquet file, next to a copy of the task YAML
shipped in this package; lmms-eval resolves the YAML's ``data_files`` against its own folder, so
``lmms_eval --include_path DIR --tasks vistrim_easyvqa`` runs offline. The functions below are the
YAML's ``!function`` entries (imported by module path: no lmms-eval import here).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...data.easyvqa import QTYPES, fixed_subset, load_split, normalize_answer
from ...errors import VistrimError

TASK_YAML = Path(__file__).resolve().parent / "vistrim_easyvqa.yaml"
DATA_FILE = "easyvqa_test.parquet"  # the name the YAML's data_files gives


def export_easyvqa(out: Path, limit: int | None = None, seed: int = 0) -> tuple[Path, Path, int]:
    """Write ``out/vistrim_easyvqa.yaml`` and ``out/easyvqa_test.parquet``; returns both paths and
    the number of questions."""
    try:
        import datasets
    except ImportError:
        raise VistrimError(
            "export-task needs the datasets package: pip install 'vistrim[lmms-eval]'"
        ) from None
    datasets.disable_progress_bars()
    items = load_split("test")
    if limit is not None:
        items = fixed_subset(items, limit, seed=seed)
    columns = {
        "question_id": list(range(len(items))),
        "question": [item.question for item in items],
        "answer": [item.answer for item in items],
        "qtype": [item.qtype for item in items],
        "image": [item.image_path for item in items],
    }
    table = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    out.mkdir(parents=True, exist_ok=True)
    data = out / DATA_FILE
    # embed the image bytes: the file stands alone, wherever easy-vqa is installed
    table.to_parquet(str(data))
    yaml_path = out / TASK_YAML.name
    shutil.copyfile(TASK_YAML, yaml_path)
    return yaml_path, data, len(items)


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list) -> dict:
    """accuracy for every question, and accuracy_<type> only for questions of that type (None
    elsewhere, skipped by ``mean_of_present``)."""
    response = results[0] if results else ""
    correct = float(normalize_answer(str(response)) == normalize_answer(doc["answer"]))
    scores = {"accuracy": correct}
    for qtype in QTYPES:
        scores[f"accuracy_{qtype}"] = correct if doc["qtype"] == qtype else None
    return scores


def mean_of_present(values: list) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
