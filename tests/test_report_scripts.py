"""The report scripts behind the README tables: ``eval_tables.py`` and ``paired_intervals.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(label, method, budgets, correct, tokens):
    acc = float(np.mean(correct))
    return {
        "label": label,
        "method": method,
        "budgets": budgets,
        "accuracy": acc,
        "n": len(correct),
        "by_type": {"color": {"accuracy": acc, "n": len(correct)}},
        "by_size": {"0-3": {"accuracy": acc, "n": len(correct)}},
        "relative_accuracy": acc / 0.75,
        "layer_average_visual": tokens,
        "correct": correct,
    }


@pytest.fixture()
def evals(tmp_path):
    unpruned = row("unpruned", None, [], [1, 1, 1, 0], 576.0)
    main = tmp_path / "main.json"
    main.write_text(json.dumps({"rows": [unpruned, row("random", "random", [64], [1, 0, 0, 0], 64.1)]}))
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps({"rows": [unpruned, row("st3:queries=text", "st3", [64], [1, 1, 0, 0], 64.0)]})
    )
    return main, extra


def test_eval_tables_prints_every_row_once(evals, capsys):
    load("eval_tables").main([str(p) for p in evals])
    out = capsys.readouterr().out
    assert out.count("| unpruned | - |") == 2  # once per table, not once per file
    assert "| random | 64 | 64.1 | 64.1 | 25.0% | 33.3% | 25.0% |" in out
    assert "| st3:queries=text | 64 | 64.0 | 64.0 | 50.0% | 66.7% | 50.0% |" in out
    assert out.rstrip().endswith("| n | | 4 |")


def test_eval_tables_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        load("eval_tables").main([str(tmp_path / "absent.json")])


def test_paired_difference_is_exact_when_every_question_moves_the_same_way():
    paired = load("paired_intervals").paired
    mean, low, high = paired(np.array([1, 1, 1, 1]), np.array([0, 0, 0, 0]), 200, np.random.default_rng(0))
    assert (mean, low, high) == (100.0, 100.0, 100.0)
    mean, low, high = paired(np.array([1, 0, 1, 0]), np.array([0, 0, 1, 1]), 500, np.random.default_rng(0))
    assert mean == 0.0 and low < 0 < high
