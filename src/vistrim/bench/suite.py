"""``vistrim bench`` as Python: plan the grid, measure it, write the files. The CLI only parses.

>>> from vistrim.bench.suite import BenchPlan, bench, write_outputs
>>> plan = BenchPlan.resolve(model="testbed", quick=True)
>>> document, rows = bench(model, processor, "fastv,st3", plan)
>>> write_outputs(document, rows, plan, "results/my-bench")

The main table is measured at the smallest batch size; with several (``batch_size="1,8,32"``) every
configuration is also timed at the others (``document["throughput"]``), and with a ``kv_budget``
at the largest batch it fits in that much KV cache (``document["capacity"]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VistrimError

# (full run, quick run); the quick run keeps the shape of the full one at a fraction of its cost.
LABELLED = ("testbed", "testbed2")  # the shipped models that answer their own test questions right
DEFAULTS = {
    "budgets": ("0.33,0.22,0.11", "0.33,0.11"),
    "repeats": (5, 2),
    "max_new_tokens": (64, 16),
    "samples_labelled": (300, 32),
    "samples_other": (16, 4),
}


@dataclass(frozen=True)
class BenchPlan:
    """What one benchmark run measures (everything but the model and the methods)."""

    model: str = "testbed"  # the model's name as given (recorded; ``testbed`` has labels)
    device: str = "cpu"
    dtype: str = "float32"
    budgets: str = DEFAULTS["budgets"][0]
    max_new_tokens: int = 64  # tokens generated per timed run
    repeats: int = 5
    batches: tuple[int, ...] = (1,)  # prompts per timed generate; the main table at the first
    samples: int = 300  # labelled test items answered for accuracy / fidelity (0: none)
    data: str = "easy-vqa"  # where they come from: "easy-vqa" test, or "shapes" (test-bed 2's split)
    own_defaults: bool = True  # methods with their own schedule (st3, mustdrop) also get a default row
    kv_budget: tuple[str, float] | None = None  # ("bytes", n) or ("ratio", multiple of unpruned/seq)

    @property
    def batch_size(self) -> int:
        """The batch of the main table (the smallest asked for)."""
        return self.batches[0]

    @property
    def labelled(self) -> bool:
        return self.model in LABELLED

    @classmethod
    def resolve(
        cls,
        model: str = "testbed",
        *,
        quick: bool = False,
        budgets: str | None = None,
        repeats: int | None = None,
        max_new_tokens: int | None = None,
        samples: int | None = None,
        batch_size: int | str | tuple[int, ...] = 1,
        device: str = "cpu",
        dtype: str = "float32",
        kv_budget: str | None = None,
    ) -> BenchPlan:
        """Unset options from the full or quick defaults, all checked (one-line errors).
        ``batch_size``: one size or several (``"1,8,32"``); ``kv_budget``: bytes (``"512MB"``) or a
        multiple of the unpruned cache of one sequence (``"8x"``)."""
        from .batched import parse_batches, parse_kv_budget

        pick = 1 if quick else 0
        from ..data.labelled import default_data

        labelled = model in LABELLED
        plan = cls(
            model=model,
            device=device,
            dtype=dtype,
            budgets=DEFAULTS["budgets"][pick] if budgets is None else budgets,
            max_new_tokens=DEFAULTS["max_new_tokens"][pick] if max_new_tokens is None else max_new_tokens,
            repeats=DEFAULTS["repeats"][pick] if repeats is None else repeats,
            batches=parse_batches(batch_size),
            data=default_data(model),
            samples=DEFAULTS["samples_labelled" if labelled else "samples_other"][pick]
            if samples is None
            else samples,
            # st3's and mustdrop's own defaults get a row in a full run unless budgets were chosen
            own_defaults=budgets is None and not quick,
            kv_budget=None if kv_budget is None else parse_kv_budget(kv_budget),
        )
        for field, flag, low in (
            ("repeats", "--repeats", 1),
            ("max_new_tokens", "--max-new-tokens", 1),
            ("samples", "--samples", 0),
        ):
            if getattr(plan, field) < low:
                raise VistrimError(f"{flag} must be >= {low}, got {getattr(plan, field)}")
        if plan.max_new_tokens < 2:
            raise VistrimError("--max-new-tokens must be >= 2 (a time per output token needs two tokens)")
        return plan


def bench(model, processor, methods, plan: BenchPlan, budgets=None) -> tuple[dict, list[dict]]:
    """Everything that runs the model: (the ``bench.json`` document, the aggregated rows).

    ``methods``: a ``--methods`` string or a list of ``bench.specs.MethodSpec``; ``budgets``: a list
    (default: parsed from ``plan.budgets``)."""
    from ..families import family_for
    from .batched import capacity_plan, capacity_rows, throughput_rows
    from .report import aggregate, assemble
    from .runner import (
        config_meta,
        quality_all,
        time_all,
        time_batches,
        time_capacity,
        unpruned_prefill_bytes,
    )
    from .specs import parse_budgets, parse_method_specs

    specs = parse_method_specs(methods) if isinstance(methods, str) else list(methods)
    budgets = parse_budgets(plan.budgets) if budgets is None else budgets
    family = family_for(model)
    items, pool, inputs, info, configs, options = prepare(model, processor, specs, budgets, plan)
    load_start = os.getloadavg()
    raw = {"workload": info, "configs": [config_meta(c) for c in configs]}
    with ProgressBar(len(configs), len(items), options, plan) as advance:
        raw["unpruned_kv_prefill"] = unpruned_prefill_bytes(model, inputs)
        raw["timing"] = time_all(model, inputs, configs, options, advance)
        first = {"batch": plan.batch_size, "workload": info, "timing": raw["timing"]}
        raw["batches"] = time_batches(model, processor, pool, plan.batches[1:], configs, options, advance)
        if plan.kv_budget is not None:  # per-sequence bytes at the largest batch measured
            largest = raw["batches"][-1] if raw["batches"] else first
            raw["capacity"] = capacity_plan(largest, raw["configs"], plan.kv_budget)
            fits = [min(fit, len(pool)) for fit in raw["capacity"]["capacity"]]
            raw["capacity"]["capacity_run"] = fits  # what ran: the capacity, at most the prompt pool
            raw["capacity"]["timing"] = time_capacity(model, processor, pool, fits, configs, options, advance)
        raw["quality"] = quality_all(model, processor, items, configs, options, advance) if items else None
    shape = family.flops_shape()
    rows = aggregate(raw, shape, family.geometry.num_layers)
    settings = run_settings(model, plan, budgets, configs, items, options)
    settings["load_average"] = {"start": load_start, "end": os.getloadavg()}
    document = assemble(settings, rows, raw, shape)
    if len(plan.batches) > 1 or plan.kv_budget is not None:
        document["throughput"] = throughput_rows([first, *raw["batches"]], raw["configs"])
    if plan.kv_budget is not None:
        document["capacity"] = {
            **{k: v for k, v in raw["capacity"].items() if k != "timing"},
            "rows": capacity_rows(raw["capacity"], raw["configs"], raw["capacity"]["timing"]),
        }
    return document, rows


def prepare(model, processor, specs, budgets, plan: BenchPlan):
    """Items answered for quality (a fixed labelled test subset of ``plan.data``), the pool of timing
    prompts (one per image), the first batch's timing inputs and the configuration grid."""
    from ..data.easyvqa import fixed_subset
    from ..data.labelled import labelled_pool
    from ..families import family_for
    from .runner import BenchOptions, timing_items, workload
    from .specs import build_configs

    split = labelled_pool(plan.data)
    items = fixed_subset(split, plan.samples, seed=0) if plan.samples else []
    pool = timing_items(split, len(split))
    if plan.batches[-1] > len(pool):
        raise VistrimError(f"--batch-size {plan.batches[-1]} is more than the {len(pool)} test images")
    inputs, info = workload(model, processor, pool, plan.batch_size)
    num_layers = family_for(model).geometry.num_layers
    configs = build_configs(specs, budgets, info["visual_tokens"][0], num_layers, plan.own_defaults)
    options = BenchOptions(
        new_tokens=plan.max_new_tokens,
        repeats=plan.repeats,
        batch=plan.batch_size,
        labelled=plan.labelled,
        # the test-bed answers one word; other models get room for a short phrase
        quality_tokens=2 if plan.labelled else 8,
        quality_batch=50 if plan.labelled else 8,
    )
    return items, pool, inputs, info, configs, options


def run_settings(model, plan: BenchPlan, budgets, configs, items, options) -> dict:
    from ..data.labelled import labelled_data_name
    from .runner import environment

    return {
        "model": plan.model,
        **environment(model, plan.device, plan.dtype),
        "data": labelled_data_name(plan.data),
        "budgets": budgets,
        "methods": [f"{c.label} @ {c.budget_label}" for c in configs],
        "samples": len(items),
        "batches": list(plan.batches),
        "kv_budget": None if plan.kv_budget is None else list(plan.kv_budget),
        "warmup": "every configuration at the first batch; elsewhere the unpruned model",
        "options": dataclasses.asdict(options),
    }


class ProgressBar:
    """One bar over the whole run: warm-up, timed runs, then answered items (weighted alike)."""

    def __init__(self, n_configs: int, n_items: int, options, plan: BenchPlan | None = None) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        runs = (n_configs + 1) * (1 + options.repeats)
        if plan is not None:  # other batch sizes: one warm-up each; capacity runs
            runs += (len(plan.batches) - 1) * (1 + (n_configs + 1) * options.repeats)
            runs += (n_configs + 1) * options.repeats if plan.kv_budget is not None else 0
        self.total = runs + (n_configs + 1) * n_items
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn()
        )

    def __enter__(self):
        self.progress.start()
        self.task = self.progress.add_task("bench", total=self.total)
        return self.advance

    def advance(self, what: str, n: float) -> None:
        self.progress.update(self.task, advance=n, description=f"bench: {what}")

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def write_outputs(document: dict, rows: list[dict], plan: BenchPlan, out: str | Path, console=None) -> None:
    """``bench.json``, ``table.md`` and the plots in ``out``; the tables also on the console."""
    from rich.console import Console

    from . import batched
    from .report import LEGEND, bench_table, markdown_table, plot_accuracy, plot_speedup

    console = console or Console()
    wide = Console(width=max(150, console.width))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(document, indent=1, default=str))
    s = document["settings"]
    machine = f"{s['model']} | {s['device']} {s['dtype']} {s['attention']} | {s['cpu']}"
    machine += f", {s['torch_threads']} threads"
    load = s["load_average"]
    loads = f"load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end"
    title = (
        f"{machine} | batch {plan.batch_size}, {plan.max_new_tokens} new tokens, "
        f"median of {plan.repeats} | {s['samples']} samples | {loads}"
    )
    wide.print(bench_table(rows, title))
    text = [f"{title}\n\n{markdown_table(rows)}\n{LEGEND}\n"]
    files = ["bench.json", "table.md", "speedup_vs_budget.png"]
    plot_speedup(rows, out / "speedup_vs_budget.png", title)
    if rows[0].get("accuracy", rows[0]["identical"]) is not None:
        plot_accuracy(rows, out / "accuracy_vs_speedup.png", title)
        files.append("accuracy_vs_speedup.png")
    if "throughput" in document:
        heading = f"{machine} | {plan.max_new_tokens} new tokens, median of {plan.repeats} | {loads}"
        cells = batched.throughput_cells(document["throughput"])
        wide.print(
            batched.rich_table(cells, f"throughput by batch size | {heading}", batched.THROUGHPUT_LEGEND)
        )
        legend = batched.THROUGHPUT_LEGEND
        text.append(f"\nThroughput by batch size ({heading})\n\n{batched.markdown(cells)}\n{legend}\n")
        capacity = document.get("capacity")
        if capacity is not None:
            budget = f"KV budget {capacity['budget_bytes'] / 1e6:.1f} MB"
            cells = batched.capacity_cells(capacity["rows"])
            wide.print(batched.rich_table(cells, f"capacity | {budget} | {heading}", batched.CAPACITY_LEGEND))
            text.append(
                f"\nCapacity ({budget}; {heading})\n\n{batched.markdown(cells)}\n{batched.CAPACITY_LEGEND}\n"
            )
        batched.plot_throughput(
            document["throughput"],
            capacity["rows"] if capacity else None,
            out / "throughput_vs_batch.png",
            heading,
        )
        files.append("throughput_vs_batch.png")
    (out / "table.md").write_text("".join(text))
    console.print(f"FLOPs: {s['flops_included']}. Memory: {s['peak_memory_note']}")
    console.print(f"wrote {out}/{', '.join(files)}")
