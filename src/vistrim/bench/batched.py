"""Batched throughput and memory-capped capacity, from raw timing records (pure), with their tables
and a plot.

At batch 1 on a CPU a decoding step reads every weight whatever the cache length, so a smaller KV
cache barely shows. What it buys shows with batches: each step reads less cache once the cache
rivals the weights, and more sequences fit in the same memory. ``throughput_rows`` gives, per
configuration and batch size, decoding tokens per second for the whole batch (and prefill time),
paired with the unpruned model at the same batch; ``capacity_plan`` the largest batch each
configuration fits in a KV budget after a fixed answer length, and ``capacity_rows`` the throughput
measured there.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from ..errors import VistrimError
from .numbers import spread

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_batches(text: str | int | Sequence[int]) -> tuple[int, ...]:
    """``--batch``: one size or a comma list (``1,8,32``), each >= 1; sorted, without repeats."""
    if isinstance(text, int):
        pieces = [text]
    elif isinstance(text, str):
        pieces = [p.strip() for p in text.split(",") if p.strip()]
    else:
        pieces = list(text)
    sizes = []
    for piece in pieces:
        try:
            size = int(piece)
        except (TypeError, ValueError):
            raise VistrimError(f"--batch-size: {piece!r} is not an integer (e.g. 1,8,32)") from None
        if size < 1:
            raise VistrimError(f"--batch-size must be >= 1, got {size}")
        sizes.append(size)
    if not sizes:
        raise VistrimError("--batch-size is empty")
    return tuple(sorted(set(sizes)))


def parse_kv_budget(text: str) -> tuple[str, float]:
    """``--kv-budget``: bytes (``268435456``, ``512MB``, ``2GiB``) -> ("bytes", n), or a multiple of
    the unpruned model's cache for one sequence (``8x``) -> ("ratio", 8.0)."""
    match = _BUDGET.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or (unit not in _UNITS and unit != "x"):
        raise VistrimError(
            f"bad --kv-budget {text!r}: bytes (e.g. 536870912, 512MB, 2GiB) or a multiple of the "
            "unpruned cache of one sequence (e.g. 8x)"
        )
    value = float(match.group(1))
    if unit == "x":
        if value <= 0:
            raise VistrimError(f"bad --kv-budget {text!r}: the multiple must be > 0")
        return "ratio", value
    if value * _UNITS[unit] < 1:
        raise VistrimError(f"bad --kv-budget {text!r}: at least one byte")
    return "bytes", value * _UNITS[unit]


# ---------------------------------------------------------------------- arithmetic (pure)
def step_median(run: dict) -> float:
    steps = run["timing"]["steps"]
    return statistics.median(steps) if steps else 0.0


def decode_rate(run: dict, batch: int) -> float:
    """Decoding tokens per second of the whole batch: ``batch`` tokens per median step."""
    return batch / max(step_median(run), 1e-12)


def decode_hook_share(run: dict) -> float | None:
    """Time vistrim spent in decoding steps (method hooks and the runtime's own work) as a share of
    the decoding time (the sum of the steps); None for the plain model."""
    if "hook_seconds_decode" not in run:
        return None
    hooks = run["hook_seconds_decode"] + run.get("runtime_seconds_decode", 0.0)
    return hooks / max(sum(run["timing"]["steps"]), 1e-12)


def hook_share_spread(runs: Sequence[dict]) -> dict | None:
    shares = [decode_hook_share(r) for r in runs]
    return None if any(s is None for s in shares) else spread(shares)


def paired(base: Sequence[dict], runs: Sequence[dict], pick) -> dict:
    """Ratio base / run repeat by repeat (each run paired with the unpruned run before it)."""
    return spread([pick(b) / max(pick(r), 1e-12) for b, r in zip(base, runs)])


def peak_bytes(runs: Sequence[dict]) -> int:
    """The most KV bytes a run held: the method's recorded peak, or for the plain model (whose
    cache only grows) what it holds at the end."""
    stats = runs[0].get("stats")
    if stats is not None and stats.get("kv_bytes_peak") is not None:
        return stats["kv_bytes_peak"]
    return sum(runs[0]["kv_bytes_final_read"])


def throughput_row(meta: dict, batch: int, base: Sequence[dict], runs: Sequence[dict]) -> dict:
    """One configuration at one batch size; ``base`` are the unpruned runs at that batch."""
    final, base_final = sum(runs[0]["kv_bytes_final_read"]), sum(base[0]["kv_bytes_final_read"])
    return {
        "label": meta["label"],
        "method": meta["method"],
        "budgets": meta["budgets"],
        "batch": batch,
        "prefill_s": spread([r["timing"]["prefill"] for r in runs]),
        "prefill_speedup": paired(base, runs, lambda r: r["timing"]["prefill"]),
        "per_token_s": spread([step_median(r) for r in runs]),
        "decode_tokens_per_s": spread([decode_rate(r, batch) for r in runs]),
        "throughput_speedup": paired(base, runs, step_median),
        "e2e_speedup": paired(base, runs, lambda r: r["timing"]["e2e"]),
        "kv_bytes_final_per_sequence": final / batch,
        "kv_bytes_peak_per_sequence": peak_bytes(runs) / batch,
        "kv_ratio_final": final / max(base_final, 1),
        "decode_hook_share": hook_share_spread(runs),
    }


UNPRUNED_META = {"label": "unpruned", "method": None, "budgets": []}


def throughput_rows(entries: Sequence[dict], configs: Sequence[dict]) -> list[dict]:
    """Rows for every batch entry ({"batch", "timing": {"runs"}}, runs[0] the unpruned model, then
    one list per configuration) and every configuration, batch by batch."""
    rows = []
    for entry in entries:
        runs, batch = entry["timing"]["runs"], entry["batch"]
        for meta, config_runs in zip([UNPRUNED_META, *configs], runs):
            rows.append(throughput_row(meta, batch, runs[0], config_runs))
    return rows


def budget_bytes(kv_budget: tuple[str, float], unpruned_per_sequence: float) -> float:
    kind, value = kv_budget
    return value * unpruned_per_sequence if kind == "ratio" else value


def capacity_plan(entry: dict, configs: Sequence[dict], kv_budget: tuple[str, float]) -> dict:
    """The largest batch each configuration fits in the KV budget, from the per-sequence peak KV
    bytes of the runs in ``entry`` (answer included). Take the largest batch measured: a batched
    cache can hold more per sequence than one alone (padding; entries a row dropped but another
    row kept stay in place, masked). A ratio budget is a multiple of the unpruned model's bytes
    per sequence there. Index 0 is the unpruned model."""
    runs, batch = entry["timing"]["runs"], entry["batch"]
    per_sequence = [peak_bytes(r) / batch for r in runs]
    budget = budget_bytes(kv_budget, per_sequence[0])
    fits = [math.floor(budget / p + 1e-9) if p > 0 else 0 for p in per_sequence]
    return {
        "kv_budget": {"kind": kv_budget[0], "value": kv_budget[1]},
        "budget_bytes": budget,
        "measured_at_batch": batch,
        "labels": [m["label"] for m in [UNPRUNED_META, *configs]],
        "per_sequence_peak_bytes": per_sequence,
        "capacity": fits,
        # the batch ratio as the budget grows (no rounding down): unpruned bytes / method bytes
        "capacity_ratio_limit": [per_sequence[0] / p if p > 0 else None for p in per_sequence],
    }


def run_peak(record: dict) -> int:
    """Peak KV bytes of one timed run (the plain model's cache only grows: its final size)."""
    return record.get("kv_bytes_peak") or sum(record["kv_bytes_final_read"])


def capacity_rows(plan: dict, configs: Sequence[dict], timing: dict | None) -> list[dict]:
    """Per configuration: the batch that fits, its ratio to the unpruned model's, and (when measured)
    decoding throughput at that batch, paired with the unpruned model at its own capacity, and the
    KV bytes the run at that batch really held (``within_budget`` checks the estimate)."""
    rows = []
    base_fit = plan["capacity"][0]
    runs = timing["runs"] if timing else None
    for index, meta in enumerate([UNPRUNED_META, *configs]):
        fit = plan["capacity"][index]
        row = {
            "label": meta["label"],
            "method": meta["method"],
            "budgets": meta["budgets"],
            "per_sequence_peak_bytes": plan["per_sequence_peak_bytes"][index],
            "capacity": fit,
            "capacity_ratio": fit / base_fit if base_fit else None,
            "capacity_ratio_limit": plan["capacity_ratio_limit"][index],
            "decode_tokens_per_s": None,
            "throughput_ratio": None,
            "decode_hook_share": None,
            "peak_bytes_at_capacity": None,
            "within_budget": None,
        }
        measured = runs is not None and runs[index] and runs[0] and fit > 0
        if measured:
            row["decode_tokens_per_s"] = spread([decode_rate(r, fit) for r in runs[index]])
            row["throughput_ratio"] = spread(
                [decode_rate(r, fit) / decode_rate(b, base_fit) for b, r in zip(runs[0], runs[index])]
            )
            row["decode_hook_share"] = hook_share_spread(runs[index])
            row["peak_bytes_at_capacity"] = max(run_peak(r) for r in runs[index])
            row["within_budget"] = row["peak_bytes_at_capacity"] <= plan["budget_bytes"] * (1 + 1e-9)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- tables
def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _median(value) -> float | None:
    return None if value is None else value["median"]


THROUGHPUT_COLUMNS = ("method", "budget", "batch", "prefill s", "prefill x", "tok/s", "tok/s x")
THROUGHPUT_COLUMNS += ("e2e x", "KV/seq MB", "KV end", "dec. hooks")
CAPACITY_COLUMNS = ("method", "budget", "KV peak/seq MB", "fits", "fits x", "KV there MB", "tok/s there")
CAPACITY_COLUMNS += ("tok/s x",)
THROUGHPUT_LEGEND = (
    "tok/s: decoding tokens per second of the whole batch (batch / median time per step); x: ratio to "
    "the unpruned model at the same batch, median of repeats paired with the unpruned run before them. "
    "KV/seq: cache bytes per sequence after the answer (padding included); KV end: / unpruned. "
    "dec. hooks: time in vistrim's decoding work (method hooks + runtime) / decoding time."
)
CAPACITY_LEGEND = (
    "KV peak/seq: the most cache bytes per sequence during a run at the largest batch measured (answer "
    "included). fits: the largest batch within the budget at that rate; KV there: the peak a run at "
    "that batch held (* over the budget); tok/s there: decoding throughput measured at that batch, "
    "x: / the unpruned model at its own."
)


def _budget(row: dict) -> str:
    return ",".join(map(str, row["budgets"])) or "-"


def throughput_cells(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    body = []
    for r in rows:
        body.append(
            [
                r["label"],
                _budget(r),
                str(r["batch"]),
                _fmt(r["prefill_s"]["median"], "{:.2f}"),
                _fmt(r["prefill_speedup"]["median"], "{:.2f}x"),
                _fmt(r["decode_tokens_per_s"]["median"], "{:.1f}"),
                _fmt(r["throughput_speedup"]["median"], "{:.2f}x"),
                _fmt(r["e2e_speedup"]["median"], "{:.2f}x"),
                _fmt(r["kv_bytes_final_per_sequence"] / 1e6, "{:.1f}"),
                _fmt(r["kv_ratio_final"], "{:.0%}"),
                _fmt(_median(r["decode_hook_share"]), "{:.1%}"),
            ]
        )
    return list(THROUGHPUT_COLUMNS), body


def capacity_cells(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    body = []
    for r in rows:
        body.append(
            [
                r["label"],
                _budget(r),
                _fmt(r["per_sequence_peak_bytes"] / 1e6, "{:.1f}"),
                str(r["capacity"]),
                _fmt(r["capacity_ratio"], "{:.2f}x"),
                _fmt(r.get("peak_bytes_at_capacity") and r["peak_bytes_at_capacity"] / 1e6, "{:.1f}")
                + ("*" if r.get("within_budget") is False else ""),
                _fmt(_median(r["decode_tokens_per_s"]), "{:.1f}"),
                _fmt(_median(r["throughput_ratio"]), "{:.2f}x"),
            ]
        )
    return list(CAPACITY_COLUMNS), body


def rich_table(cells: tuple[list[str], list[list[str]]], title: str, caption: str) -> Table:
    header, body = cells
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column in ("method", "budget") else "right")
    for row in body:
        table.add_row(*row)
    return table


def markdown(cells: tuple[list[str], list[list[str]]]) -> str:
    header, body = cells
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plot
def plot_throughput(rows: Sequence[dict], capacity: Sequence[dict] | None, path: Path, title: str) -> None:
    """Decoding throughput (tokens/s of the whole batch) and its ratio to unpruned against batch
    size, a line per configuration; crosses: the throughput each reaches at its KV-budget capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((r["label"], _budget(r)), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {}
    for (label, budget), points in lines.items():
        points = sorted(points, key=lambda r: r["batch"])
        name = label if label == "unpruned" else f"{label} @ {budget}"
        style = {"color": "black", "ls": "--"} if label == "unpruned" else {}
        batches = [p["batch"] for p in points]
        (handle,) = axes[0].plot(
            batches, [p["decode_tokens_per_s"]["median"] for p in points], marker="o", label=name, **style
        )
        colours[(label, budget)] = handle.get_color()
        axes[1].plot(batches, [p["throughput_speedup"]["median"] for p in points], marker="o", **style)
    for r in capacity or []:
        if r["decode_tokens_per_s"] is not None:
            colour = colours.get((r["label"], _budget(r)), "gray")
            point = (r["capacity"], r["decode_tokens_per_s"]["median"])
            axes[0].scatter(*point, marker="X", s=90, color=colour)
            axes[0].annotate(
                str(r["capacity"]), point, xytext=(4, -10), textcoords="offset points", fontsize=7
            )
    ticks = sorted({r["batch"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
    axes[0].set_ylabel("decoding tokens/s (whole batch)")
    axes[0].set_title("throughput" + (" (X: at the KV-budget capacity)" if capacity else ""))
    axes[1].axhline(1.0, color="gray", lw=0.8, ls="--")
    axes[1].set_ylabel("throughput / unpruned at the same batch")
    axes[1].set_title("decoding speed-up")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
