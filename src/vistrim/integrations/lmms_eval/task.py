"""Local lmms-eval tasks scored as ``vistrim eval`` scores them (the first word or number of the
answer, lower-cased, must be the label): ``vistrim_easyvqa`` (easy-vqa test questions) and
``vistrim_shapes`` (test-bed 2's test split: small shapes on photographs; colour, shape, presence,
count and relation questions).

``export_task`` writes the questions (a fixed seeded subset, the one ``vistrim eval`` draws for
the same count and seed) with their images to one parquet file, next to a copy of the task YAML
shipped in this package; lmms-eval resolves the YAML's ``data_files`` against its own folder, so
``lmms_eval --include_path DIR --tasks vistrim_easyvqa`` (or ``vistrim_shapes``) runs offline. The
functions below are the YAML's ``!function`` entries (imported by module path: no lmms-eval import
here).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...data.easyvqa import QTYPES, fixed_subset, normalize_answer
from ...data.shapes import QTYPES as SHAPES_QTYPES
from ...errors import VistrimError

HERE = Path(__file__).resolve().parent
# name -> (task YAML shipped here, the data file its data_files names, question types)
TASKS = {
    "easyvqa": ("vistrim_easyvqa.yaml", "easyvqa_test.parquet", QTYPES),
    "shapes": ("vistrim_shapes.yaml", "shapes_test.parquet", SHAPES_QTYPES),
}
TASK_YAML = HERE / TASKS["easyvqa"][0]
DATA_FILE = TASKS["easyvqa"][1]


def export_task(name: str, out: Path, limit: int | None = None, seed: int = 0) -> tuple[Path, Path, int]:
    """Write ``out/<task yaml>`` and ``out/<data file>`` for ``name`` (``easyvqa`` or ``shapes``);
    returns both paths and the number of questions."""
    try:
        import datasets
    except ImportError:
        raise VistrimError(
            "export-task needs the datasets package: pip install 'vistrim[lmms-eval]'"
        ) from None
    from ...data.labelled import labelled_pool

    datasets.disable_progress_bars()
    yaml_name, data_name, _ = TASKS[name]
    items = labelled_pool("shapes" if name == "shapes" else "easy-vqa")
    if limit is not None:
        items = fixed_subset(items, limit, seed=seed)
    columns = {
        "question_id": list(range(len(items))),
        "question": [item.question for item in items],
        "answer": [item.answer for item in items],
        "qtype": [item.qtype for item in items],
        # easy-vqa: the image files; test-bed 2: the rendered scenes (PIL images)
        "image": [item.image_path if name == "easyvqa" else item.load_image() for item in items],
    }
    if name == "shapes":
        columns["object_size"] = [item.size for item in items]  # patches the evidence covers
    table = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    out.mkdir(parents=True, exist_ok=True)
    data = out / data_name
    # embed the image bytes: the file stands alone, wherever the data came from
    table.to_parquet(str(data))
    yaml_path = out / yaml_name
    shutil.copyfile(HERE / yaml_name, yaml_path)
    return yaml_path, data, len(items)


def export_easyvqa(out: Path, limit: int | None = None, seed: int = 0) -> tuple[Path, Path, int]:
    """``export_task("easyvqa", ...)``."""
    return export_task("easyvqa", out, limit, seed)


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def _scores(doc: dict, results: list, qtypes) -> dict:
    response = results[0] if results else ""
    correct = float(normalize_answer(str(response)) == normalize_answer(doc["answer"]))
    scores = {"accuracy": correct}
    for qtype in qtypes:
        scores[f"accuracy_{qtype}"] = correct if doc["qtype"] == qtype else None
    return scores


def process_results(doc: dict, results: list) -> dict:
    """accuracy for every question, and accuracy_<type> only for questions of that type (None
    elsewhere, skipped by ``mean_of_present``)."""
    return _scores(doc, results, TASKS["easyvqa"][2])


def process_results_shapes(doc: dict, results: list) -> dict:
    """As :func:`process_results`, with test-bed 2's question types."""
    return _scores(doc, results, TASKS["shapes"][2])


def mean_of_present(values: list) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
