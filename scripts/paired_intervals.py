"""Paired bootstrap intervals between `vistrim eval` runs on the same questions.

    python scripts/paired_intervals.py main/eval.json ablations/eval.json [--against random]

Every row of every ``eval.json`` (same model, data and ``--limit``, so the same questions in the
same order) is compared with the ``--against`` row at the same budget: the mean paired difference
in accuracy (points) and a percentile bootstrap interval over questions (``--resamples`` draws,
``--seed``). The ``--against`` rows are also compared with unpruned. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def paired(a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, ...]:
    """Mean of a - b in points and its 95% percentile bootstrap interval (questions resampled)."""
    diff = a.astype(float) - b.astype(float)
    draws = rng.integers(0, len(diff), (resamples, len(diff)))
    means = diff[draws].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return 100 * diff.mean(), 100 * low, 100 * high


def load_rows(paths: list[Path]) -> tuple[np.ndarray | None, list[dict]]:
    unpruned, rows, questions = None, [], None
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: cannot read an eval.json ({exc})") from None
        for row in data["rows"]:
            correct = np.asarray(row["correct"], dtype=bool)
            if questions is None:
                questions = len(correct)
            if len(correct) != questions:
                raise SystemExit(f"{path}: {row['label']} has {len(correct)} answers, not {questions}")
            if row["method"] is None:
                unpruned = correct
            else:
                rows.append({**row, "correct": correct})
    return unpruned, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("evals", nargs="+", type=Path, help="eval.json files of one model and question set")
    p.add_argument("--against", default="random", help="the row label every other row is compared with")
    p.add_argument("--resamples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unpruned, rows = load_rows(args.evals)
    base = {tuple(r["budgets"]): r for r in rows if r["label"] == args.against}
    if not base:
        raise SystemExit(f"no {args.against!r} row in {', '.join(map(str, args.evals))}")
    budgets = sorted(base, reverse=True)
    rng = np.random.default_rng(args.seed)
    header = "| method | " + " | ".join(str(b[0]) if len(b) == 1 else str(list(b)) for b in budgets) + " |"
    lines = [header, "|---" * (len(budgets) + 1) + "|"]
    labels = list(dict.fromkeys(r["label"] for r in rows if r["label"] != args.against))
    for label in labels:
        cells = []
        for budget in budgets:
            row = next((r for r in rows if r["label"] == label and tuple(r["budgets"]) == budget), None)
            if row is None:
                cells.append("")
                continue
            mean, low, high = paired(row["correct"], base[budget]["correct"], args.resamples, rng)
            cell = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
            reached = row["layer_average_visual"]
            if reached > budget[0] + 1.0:  # the tolerance of `vistrim eval`'s budget warning
                cell += f" (at {reached:.1f} tokens)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines) + "\n")
    if unpruned is not None:
        for budget in budgets:
            mean, low, high = paired(base[budget]["correct"], unpruned, args.resamples, rng)
            print(f"{args.against} at {budget[0]} against unpruned: {mean:+.1f} [{low:+.1f}, {high:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
