"""Tables and plots of evaluation rows (accuracy or fidelity per method x budget)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def post_cut(row: dict) -> float:
    """A row's layer-averaged visual tokens counted post-cut (as released code logs them)."""
    return row.get("layer_average_visual_post_cut", row["layer_average_visual"])


def budget_target(budget, visual_in: list[float]) -> tuple[float, str] | None:
    """The layer-averaged visual tokens a row's budget asks for (mean over the samples, whose
    unpruned counts are ``visual_in``) and how they are counted; None for ``default``."""
    text, _, counting = str(budget).partition(":")
    try:
        value = float(text)
    except ValueError:  # "default", or a row without a budget
        return None
    if not visual_in:
        return None
    per_sample = [value * n if "." in text else min(value, n) for n in visual_in]
    return sum(per_sample) / len(per_sample), counting or "processed"


def missed_budgets(rows: list[dict], tolerance: float = 1.0) -> list[str]:
    """One line per row whose reached tokens exceed its budget by more than ``tolerance`` per
    sample (a method that cannot go that low on the model with its settings: layers before its
    first cut see every token, protected tokens stay): such a row is not comparable at that budget."""
    visual_in = rows[0].get("reached_per_sample") or [rows[0]["layer_average_visual"]]
    lines = []
    for row in rows[1:]:
        budgets = row.get("budgets") or []
        target = budget_target(budgets[0], visual_in) if len(budgets) == 1 else None
        if target is None:
            continue
        goal, counting = target
        reached = post_cut(row) if counting == "post_cut" else row["layer_average_visual"]
        if reached > goal + tolerance:
            lines.append(
                f"{row['label']} at {budgets[0]}: reached {reached:.1f} layer-averaged visual tokens, not "
                f"{goal:.1f}: it cannot go lower here with these settings (layers before its first cut see "
                "every token; protected tokens stay): compare it at the tokens it reached"
            )
    return lines


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


def size_table(rows: list[dict], title: str) -> Table:
    """Accuracy per bin of the answer object's area in patches (rows that carry ``by_size``)."""
    bins = list(dict.fromkeys(b for r in rows for b in r.get("by_size", {})))
    table = Table(title=title, title_justify="left")
    for column in ("method", "budget", "tokens", *bins):
        table.add_column(column, justify="left" if column in ("method", "budget") else "right")
    for r in rows:
        cells = [pct(r.get("by_size", {}).get(b, {}).get("accuracy")) for b in bins]
        table.add_row(r["label"], budget_text(r), f"{r['layer_average_visual']:.1f}", *cells)
    first = rows[0].get("by_size", {})
    table.add_row("n", "", "", *(str(first.get(b, {}).get("n", "-")) for b in bins))
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


def plot_by_size(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against object size (patches), one panel per budget, a line per method; the
    unpruned model in every panel as a dashed reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = list(rows[0]["by_size"])
    budgets = list(dict.fromkeys(budget_text(r) for r in rows[1:])) or ["-"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), sharey=True, squeeze=False)
    reference = [rows[0]["by_size"][b]["accuracy"] for b in bins]
    for ax, budget in zip(axes[0], budgets):
        ax.plot(bins, reference, color="black", lw=0.8, ls="--", label="unpruned")
        for r in rows[1:]:
            if budget_text(r) == budget:
                accuracy = [r["by_size"].get(b, {}).get("accuracy") for b in bins]
                ax.plot(bins, accuracy, marker="o", label=r["label"])
        ax.set_title(f"budget {budget}", fontsize=9)
        ax.set_xlabel("answer object area (patches)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
