"""Tables and plots of evaluation rows (accuracy or fidelity per method x budget)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def post_cut(row: dict) -> float:
    """A row's layer-averaged visual tokens counted post-cut (as released code logs them)."""
    return row.get("layer_average_visual_post_cut", row["layer_average_visual"])


def pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def accuracy_table(rows: list[dict], title: str) -> Table:
    qtypes = sorted({q for r in rows for q in r["by_type"]})
    table = Table(title=title, title_justify="left")
    for column in ("method", "budget", "tokens", "post-cut", "accuracy", "relative", *qtypes, "n"):
        table.add_column(column, justify="left" if column in ("method", "budget") else "right")
    for r in rows:
        by_type = [pct(r["by_type"].get(q, {}).get("accuracy")) for q in qtypes]
        table.add_row(
            r["label"],
            budget_text(r),
            f"{r['layer_average_visual']:.1f}",
            f"{post_cut(r):.1f}",
            pct(r["accuracy"]),
            pct(r["relative_accuracy"]),
            *by_type,
            str(r["n"]),
        )
    return table


def fidelity_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("method", "budget", "tokens", "post-cut", "identical", "KL first token", "n"):
        table.add_column(column, justify="left" if column in ("method", "budget") else "right")
    for r in rows:
        table.add_row(
            r["label"],
            budget_text(r),
            f"{r['layer_average_visual']:.1f}",
            f"{post_cut(r):.1f}",
            pct(r["identical"]),
            f"{r['kl_first_token']:.4f}",
            str(r["n"]),
        )
    return table


def budget_text(row: dict) -> str:
    return ",".join(map(str, row["budgets"])) or "-"


def plot_vs_budget(rows: list[dict], key: str, ylabel: str, path: Path, title: str) -> None:
    """``key`` against the layer-averaged visual tokens reached, a line per method; the unpruned
    model (rows[0]) as a dashed reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.axhline(rows[0][key], color="black", lw=0.8, ls="--", label=f"unpruned ({rows[0][key]:.3g})")
    lines: dict[str, list[dict]] = {}
    for r in rows[1:]:
        lines.setdefault(r["label"], []).append(r)
    for label, points in lines.items():
        points = sorted(points, key=lambda r: r["layer_average_visual"])
        ax.plot(
            [p["layer_average_visual"] for p in points], [p[key] for p in points], marker="o", label=label
        )
    ax.set_xlabel("layer-averaged visual tokens reached (prefill)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
