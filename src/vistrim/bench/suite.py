"""``vistrim bench`` as Python: plan the grid, measure it, write the files. The CLI only parses.

>>> from vistrim.bench.suite import BenchPlan, bench, write_outputs
>>> plan = BenchPlan.resolve(model="testbed", quick=True)
>>> document, rows = bench(model, processor, "fastv,st3", plan)
>>> write_outputs(document, rows, plan, "results/my-bench")
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
    batch_size: int = 1  # prompts per timed generate
    samples: int = 300  # labelled test items answered for accuracy / fidelity
    data: str = "easy-vqa"  # where they come from: "easy-vqa" test, or "shapes" (test-bed 2's split)
    own_defaults: bool = True  # methods with their own schedule (st3, mustdrop) also get a default row

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
        batch_size: int = 1,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> BenchPlan:
        """Unset options from the full or quick defaults, all checked (one-line errors)."""
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
            batch_size=batch_size,
            data=default_data(model),
            samples=DEFAULTS["samples_labelled" if labelled else "samples_other"][pick]
            if samples is None
            else samples,
            # st3's and mustdrop's own defaults get a row in a full run unless budgets were chosen
            own_defaults=budgets is None and not quick,
        )
        for field, flag in (
            ("repeats", "--repeats"),
            ("max_new_tokens", "--max-new-tokens"),
            ("batch_size", "--batch-size"),
            ("samples", "--samples"),
        ):
            if getattr(plan, field) < 1:
                raise VistrimError(f"{flag} must be >= 1, got {getattr(plan, field)}")
        if plan.max_new_tokens < 2:
            raise VistrimError("--max-new-tokens must be >= 2 (a time per output token needs two tokens)")
        return plan


def bench(model, processor, methods, plan: BenchPlan, budgets=None) -> tuple[dict, list[dict]]:
    """Everything that runs the model: (the ``bench.json`` document, the aggregated rows).

    ``methods``: a ``--methods`` string or a list of ``bench.specs.MethodSpec``; ``budgets``: a list
    (default: parsed from ``plan.budgets``)."""
    from ..families import family_for
    from .report import aggregate, assemble
    from .runner import config_meta, quality_all, time_all, unpruned_prefill_bytes
    from .specs import parse_budgets, parse_method_specs

    specs = parse_method_specs(methods) if isinstance(methods, str) else list(methods)
    budgets = parse_budgets(plan.budgets) if budgets is None else budgets
    family = family_for(model)
    items, inputs, info, configs, options = prepare(model, processor, specs, budgets, plan)
    load_start = os.getloadavg()
    raw = {"workload": info, "configs": [config_meta(c) for c in configs]}
    with ProgressBar(len(configs), len(items), options) as advance:
        raw["unpruned_kv_prefill"] = unpruned_prefill_bytes(model, inputs)
        raw["timing"] = time_all(model, inputs, configs, options, advance)
        raw["quality"] = quality_all(model, processor, items, configs, options, advance)
    rows = aggregate(raw, family.flops_shape(), family.geometry.num_layers)
    settings = run_settings(model, plan, budgets, configs, items, options)
    settings["load_average"] = {"start": load_start, "end": os.getloadavg()}
    return assemble(settings, rows, raw), rows


def prepare(model, processor, specs, budgets, plan: BenchPlan):
    """Items (a fixed labelled test subset of ``plan.data``), the timing inputs and the grid."""
    from ..data.labelled import labelled_test_items
    from ..families import family_for
    from .runner import BenchOptions, workload
    from .specs import build_configs

    items, _ = labelled_test_items(plan.data, max(plan.samples, plan.batch_size))
    inputs, info = workload(model, processor, items, plan.batch_size)
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
    return items, inputs, info, configs, options


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
        "options": dataclasses.asdict(options),
    }


class ProgressBar:
    """One bar over the whole run: warm-up, timed runs, then answered items (weighted alike)."""

    def __init__(self, n_configs: int, n_items: int, options) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        runs = (n_configs + 1) * (1 + options.repeats)
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
    """``bench.json``, ``table.md`` and two plots in ``out``; the table also on the console."""
    from rich.console import Console

    from .report import LEGEND, bench_table, markdown_table, plot_accuracy, plot_speedup

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(document, indent=1, default=str))
    s = document["settings"]
    title = (
        f"{s['model']} | {s['device']} {s['dtype']} {s['attention']} | {s['cpu']}, "
        f"{s['torch_threads']} threads | batch {plan.batch_size}, {plan.max_new_tokens} new tokens, "
        f"median of {plan.repeats} | {s['samples']} samples"
    )
    Console(width=max(150, console.width)).print(bench_table(rows, title))
    (out / "table.md").write_text(f"{title}\n\n{markdown_table(rows)}\n{LEGEND}\n")
    console.print(f"FLOPs: {s['flops_included']}. Memory: {s['peak_memory_note']}")
    plot_speedup(rows, out / "speedup_vs_budget.png", title)
    plot_accuracy(rows, out / "accuracy_vs_speedup.png", title)
    console.print(f"wrote {out}/bench.json, table.md, speedup_vs_budget.png, accuracy_vs_speedup.png")
