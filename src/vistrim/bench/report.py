"""From raw benchmark records to rows of figures, the JSON file, the table and the plots.

``aggregate`` and ``assemble`` are pure (plain numbers in, plain numbers out); the table and the
plots only format rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from .batched import hook_share_spread
from .flops import FlopsShape, flops_ratio, included, prefill_flops
from .timing import spread

MEMORY_NOTE = (
    "CPU: peak RSS of the whole process (resource.getrusage); it never decreases, so each value is the "
    "peak of everything run so far, not of one configuration. CUDA: max_memory_allocated after a reset."
)


def time_summary(runs: Sequence[dict]) -> dict:
    """Median/min/max over repeats of prefill, of each repeat's median time per output token, and
    of end-to-end time."""
    timings = [r["timing"] for r in runs]
    return {
        "prefill_s": spread([t["prefill"] for t in timings]),
        "per_token_s": spread([statistics.median(t["steps"]) if t["steps"] else 0.0 for t in timings]),
        "e2e_s": spread([t["e2e"] for t in timings]),
    }


def paired_speedups(base: Sequence[dict], runs: Sequence[dict]) -> dict:
    """Speed-ups repeat by repeat (the unpruned run just before each configuration's run), then
    median/min/max: pairing cancels drift on a shared machine."""

    def ratios(pick) -> dict:
        return spread([pick(b["timing"]) / max(pick(r["timing"]), 1e-12) for b, r in zip(base, runs)])

    def per_token(t: dict) -> float:
        return statistics.median(t["steps"]) if t["steps"] else 0.0

    return {
        "prefill": ratios(lambda t: t["prefill"]),
        "per_token": ratios(per_token),
        "e2e": ratios(lambda t: t["e2e"]),
    }


def unpruned_flops(shape: FlopsShape, workload: dict, num_layers: int) -> dict:
    """Every decoder layer sees the whole prompt; the tower sees every patch (per-sample mean)."""
    tokens = statistics.mean(workload["prompt_tokens"])
    visual = statistics.mean(workload["visual_tokens"])
    return prefill_flops(shape, [tokens] * num_layers, visual, workload["tower_sequences_per_sample"])


def config_flops(shape: FlopsShape, workload: dict, stats: dict) -> dict:
    """With the tower untouched the projector maps every image token; a method that shrinks the
    tower hands fewer features on, so the projector sees what enters the first decoder layer."""
    summary = stats["summary"]
    projected = (
        summary["visual_in"] if stats["vision_tokens"] is None else summary["prefill_visual_per_layer"][0]
    )
    return prefill_flops(
        shape,
        stats["layer_tokens"],
        projected,
        workload["tower_sequences_per_sample"],
        stats["vision_tokens"],
    )


def overhead(runs: Sequence[dict]) -> dict:
    """Time in method hooks as a share of prefill time, per repeat."""
    return spread([r["hook_seconds_prefill"] / max(r["timing"]["prefill"], 1e-12) for r in runs])


def quality_record(raw: dict, index: int) -> dict | None:
    """The answers' record of row ``index`` (0 = unpruned), None when none were answered."""
    return None if raw.get("quality") is None else raw["quality"][index]


def quality_fields(record: dict | None, reference: dict | None) -> dict:
    """Quality figures of one row (all None when no items were answered, ``--samples 0``)."""
    if record is None:
        return {"layer_average_visual_answers": None, "identical": None, "kl_first_token": None}
    fields = {
        "layer_average_visual_answers": record["layer_average_visual"],
        "identical": record["fidelity"]["identical"],
        "kl_first_token": record["fidelity"]["kl_first_token"],
    }
    if "accuracy" in record:
        accuracy, base = record["accuracy"]["accuracy"], reference["accuracy"]["accuracy"]
        fields.update(
            accuracy=accuracy,
            relative_accuracy=accuracy / base if base else None,
            accuracy_by_type=record["accuracy"]["by_type"],
        )
    return fields


def post_cut_average(per_layer: Sequence[float]) -> float | None:
    """The layer average counted as released code logs it: a pruning layer counts the tokens left
    after its cut (what the next layer processes)."""
    counts = list(per_layer[1:]) + list(per_layer[-1:])
    return sum(counts) / len(counts) if counts else None


def unpruned_row(raw: dict, shape: FlopsShape, num_layers: int) -> dict:
    runs, workload = raw["timing"]["runs"][0], raw["workload"]
    final = sum(runs[0]["kv_bytes_final_read"])
    return {
        "label": "unpruned",
        "method": None,
        "budgets": [],
        "settings": {},
        "layer_average_visual": statistics.mean(workload["visual_tokens"]),
        "layer_average_visual_post_cut": statistics.mean(workload["visual_tokens"]),
        **time_summary(runs),
        "speedup": paired_speedups(runs, runs),
        "flops": unpruned_flops(shape, workload, num_layers),
        "flops_ratio": 1.0,
        "realisation_efficiency": 1.0,
        "kv_bytes_prefill": sum(raw["unpruned_kv_prefill"]),
        "kv_bytes_final": final,
        "kv_ratio_prefill": 1.0,
        "kv_ratio_final": 1.0,
        "overhead": None,
        "decode_hook_share": None,
        "peak_memory_bytes": raw["timing"]["peak_memory"][0],
        **quality_fields(quality_record(raw, 0), quality_record(raw, 0)),
    }


def config_row(raw: dict, index: int, shape: FlopsShape, base: dict) -> dict:
    """Row for configuration ``index`` (0-based in raw["configs"]); ``base`` is the unpruned row."""
    runs, meta = raw["timing"]["runs"][index + 1], raw["configs"][index]
    stats = runs[0]["stats"]
    flops = config_flops(shape, raw["workload"], stats)
    ratio = flops_ratio(flops, base["flops"])
    speedup = paired_speedups(raw["timing"]["runs"][0], runs)
    kv_prefill, kv_final = sum(stats["kv_bytes_prefill"]), sum(runs[0]["kv_bytes_final_read"])
    return {
        **meta,
        "layer_average_visual": stats["summary"]["layer_average_visual"],
        "layer_average_visual_post_cut": post_cut_average(stats["summary"]["prefill_visual_per_layer"]),
        **time_summary(runs),
        "speedup": speedup,
        "flops": flops,
        "flops_ratio": ratio,
        # measured prefill speed-up / the speed-up the FLOPs predict (1 / ratio)
        "realisation_efficiency": speedup["prefill"]["median"] * ratio,
        "kv_bytes_prefill": kv_prefill,
        "kv_bytes_final": kv_final,
        "kv_ratio_prefill": kv_prefill / base["kv_bytes_prefill"],
        "kv_ratio_final": kv_final / base["kv_bytes_final"],
        "overhead": overhead(runs),
        "hook_seconds_decode": spread([r["hook_seconds_decode"] for r in runs]),
        "decode_hook_share": hook_share_spread(runs),
        "peak_memory_bytes": raw["timing"]["peak_memory"][index + 1],
        **quality_fields(quality_record(raw, index + 1), quality_record(raw, 0)),
    }


def aggregate(raw: dict, shape: FlopsShape, num_layers: int) -> list[dict]:
    """One row for the unpruned model, then one per configuration."""
    base = unpruned_row(raw, shape, num_layers)
    return [base] + [config_row(raw, i, shape, base) for i in range(len(raw["configs"]))]


def assemble(settings: dict, rows: list[dict], raw: dict, shape: FlopsShape) -> dict:
    """The ``bench.json`` document: full settings, aggregated rows, every raw number."""
    return {
        "settings": {**settings, "flops_included": included(shape), "peak_memory_note": MEMORY_NOTE},
        "rows": rows,
        "raw": raw,
    }


# ---------------------------------------------------------------------- table
def fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


TIMING_COLUMNS = ("method", "budget", "tokens", "post-cut", "prefill x", "e2e x", "token x")
TIMING_COLUMNS += ("FLOPs", "eff.", "KV pre", "KV end", "overhead", "dec. hooks")
LEGEND = (
    "tokens: layer-averaged visual tokens reached in prefill (what each layer processes). post-cut: the "
    "same average counted as released code logs it (a pruning layer counts its survivors). "
    "x: speed-up vs unpruned, median of repeats paired with the unpruned run before them "
    "(prefill = time to first token; token = median time per output token). "
    "FLOPs: prefill FLOPs / unpruned. eff.: prefill speed-up / (1 / FLOPs ratio). "
    "KV: cache bytes / unpruned after prefill and at the end. overhead: time in method hooks / prefill time. "
    "dec. hooks: time in vistrim's decoding work (method hooks + runtime: masks, positions, cache "
    "bookkeeping) / decoding time."
)


def bench_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left", caption=LEGEND, caption_justify="left")
    header, body = table_cells(rows)
    for column in header:
        table.add_column(column, justify="left" if column in ("method", "budget") else "right")
    for cells in body:
        table.add_row(*cells)
    return table


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells shared by the terminal and the markdown table."""
    labelled = any("accuracy" in r for r in rows)
    header = list(TIMING_COLUMNS) + (["acc.", "rel. acc."] if labelled else ["same ans.", "KL 1st"])
    body = []
    for r in rows:
        cells = [
            r["label"],
            ",".join(map(str, r["budgets"])) or "-",
            fmt(r["layer_average_visual"], "{:.1f}"),
            fmt(r.get("layer_average_visual_post_cut"), "{:.1f}"),
        ]
        cells += [fmt(r["speedup"][k]["median"]) + "x" for k in ("prefill", "e2e", "per_token")]
        cells += [fmt(r["flops_ratio"], "{:.1%}"), fmt(r["realisation_efficiency"])]
        cells += [fmt(r["kv_ratio_prefill"], "{:.0%}"), fmt(r["kv_ratio_final"], "{:.0%}")]
        cells.append(fmt(r["overhead"] and r["overhead"]["median"], "{:.1%}"))
        cells.append(fmt(r.get("decode_hook_share") and r["decode_hook_share"]["median"], "{:.1%}"))
        if labelled:
            cells += [fmt(r.get("accuracy"), "{:.1%}"), fmt(r.get("relative_accuracy"), "{:.1%}")]
        else:
            cells += [fmt(r["identical"], "{:.0%}"), fmt(r["kl_first_token"], "{:.3f}")]
        body.append(cells)
    return header, body


def markdown_table(rows: list[dict]) -> str:
    header, body = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plots
def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    """Configuration rows grouped by method label, each group ordered by tokens reached."""
    lines: dict[str, list[dict]] = {}
    for r in rows[1:]:
        lines.setdefault(r["label"], []).append(r)
    return {label: sorted(points, key=lambda r: r["layer_average_visual"]) for label, points in lines.items()}


def draw(ax, rows: list[dict], x, y) -> None:
    """A line per method through its budget rows (in order of tokens reached); a method's own
    defaults are a star of the same colour, not on the line."""
    for label, points in by_method(rows).items():
        line = [p for p in points if "default" not in p["budgets"]]
        (handle,) = ax.plot([x(p) for p in line], [y(p) for p in line], marker="o", label=label)
        own = [p for p in points if "default" in p["budgets"]]
        if own:
            ax.scatter([x(p) for p in own], [y(p) for p in own], marker="*", s=120, color=handle.get_color())


def finish(fig, axes, path: Path, title: str, ylabel: str) -> None:
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=8, title="* = method's own defaults", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_speedup(rows: list[dict], path: Path, title: str) -> None:
    """Prefill and end-to-end speed-up against the layer-averaged visual tokens reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, name in zip(axes, ("prefill", "e2e"), ("prefill (time to first token)", "end to end")):
        draw(ax, rows, lambda r: r["layer_average_visual"], lambda r, key=key: r["speedup"][key]["median"])
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{name} speed-up")
        ax.set_xlabel("layer-averaged visual tokens (prefill)")
    finish(fig, axes, path, title, "speed-up vs unpruned (median)")
    plt.close(fig)


def plot_accuracy(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy (or, without labels, answers identical to unpruned) against prefill and end-to-end
    speed-up; the unpruned model is the black point at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "accuracy" if "accuracy" in rows[0] else "identical"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("prefill", "e2e")):
        ax.scatter([1.0], [rows[0][key]], color="black", zorder=3, label="unpruned")
        draw(ax, rows, lambda r, kind=kind: r["speedup"][kind]["median"], lambda r: r[key])
        ax.set_xlabel(f"{'prefill' if kind == 'prefill' else 'end-to-end'} speed-up vs unpruned (median)")
    finish(fig, axes, path, title, "accuracy" if key == "accuracy" else "answers identical to unpruned")
    plt.close(fig)
