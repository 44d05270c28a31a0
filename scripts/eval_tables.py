"""The README's accuracy tables from `vistrim eval` runs: one row per method and budget, with
reached tokens, relative accuracy and per-type accuracy, then accuracy by object size.

    python scripts/eval_tables.py main/eval.json ablations/eval.json cut-layer-4/eval.json

The unpruned row is taken from the first file only (every run of one model and ``--limit`` answers
the same questions, so it repeats). The last row of each table gives the number of questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def load(paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for i, path in enumerate(paths):
        for row in json.loads(path.read_text())["rows"]:
            if row["method"] is None and i > 0:
                continue
            rows.append(row)
    if not rows:
        raise SystemExit("no rows in the given eval.json files")
    return rows


def budget_of(row: dict) -> str:
    budgets = row["budgets"]
    if not budgets:
        return "-"
    return ",".join(f"{b:g}" if isinstance(b, (int, float)) else str(b) for b in budgets)


def tables(rows: list[dict]) -> str:
    types = list(rows[0]["by_type"])
    sizes = list(rows[0]["by_size"])
    head = ["method", "budget", "tokens", "post-cut", "accuracy", "relative", *types]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["label"],
            budget_of(r),
            f"{r['layer_average_visual']:.1f}",
            f"{r.get('layer_average_visual_post_cut', r['layer_average_visual']):.1f}",
            pct(r["accuracy"]),
            pct(r["relative_accuracy"]),
            *(pct(r["by_type"][t]["accuracy"]) for t in types),
        ]
        out.append("| " + " | ".join(cells) + " |")
    out.append(
        "| n | | | | "
        + str(rows[0]["n"])
        + " | | "
        + " | ".join(str(rows[0]["by_type"][t]["n"]) for t in types)
        + " |"
    )
    out += ["", "| method | budget | " + " | ".join(sizes) + " |", "|" + "---|" * (len(sizes) + 2)]
    for r in rows:
        out.append(
            f"| {r['label']} | {budget_of(r)} | "
            + " | ".join(pct(r["by_size"][s]["accuracy"]) for s in sizes)
            + " |"
        )
    out.append("| n | | " + " | ".join(str(rows[0]["by_size"][s]["n"]) for s in sizes) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("evals", nargs="+", type=Path, help="eval.json files of runs on the same questions")
    args = p.parse_args(argv)
    missing = [str(e) for e in args.evals if not e.is_file()]
    if missing:
        raise SystemExit(f"no such file: {', '.join(missing)}")
    print(tables(load(args.evals)))


if __name__ == "__main__":
    main()
