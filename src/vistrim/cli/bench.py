"""``vistrim bench``: speed, compute, memory and quality of every method x budget against the
unpruned model, measured interleaved in one process (specs/measurement.md)."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from ..errors import VistrimError
from .common import add_model_args

# (full run, --quick); the quick run keeps the shape of the full one at a fraction of its cost.
DEFAULTS = {
    "budgets": ("0.33,0.22,0.11", "0.33,0.11"),
    "repeats": (5, 2),
    "new_tokens": (64, 16),
    "samples_labelled": (300, 32),
    "samples_other": (16, 4),
}


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="speed-up, FLOPs, KV memory and accuracy per method x budget")
    add_model_args(bench)
    bench.add_argument("--methods", help="comma list of name or name:key=value;key=value (default: all)")
    bench.add_argument("--budgets", help="layer-averaged visual budgets: ratios, counts or 'default'")
    bench.add_argument("--new-tokens", type=int, help="tokens generated per timed run (default 64)")
    bench.add_argument("--repeats", type=int, help="timed repeats, median reported (default 5)")
    bench.add_argument("--batch", type=int, default=1, help="prompts per timed generate (default 1)")
    bench.add_argument(
        "--samples",
        type=int,
        help="labelled test items answered for accuracy/fidelity (testbed2: its own split)",
    )
    bench.add_argument("--quick", action="store_true", help="fewer budgets, repeats, tokens and samples")
    bench.add_argument("--out", help="output folder (default results/bench-<model>-<timestamp>)")
    add_threads_arg(bench)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: robust on a shared CPU, see bench/timing.py)",
    )


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the full or quick defaults and check them."""
    pick = 1 if args.quick else 0
    labelled = args.model in ("testbed", "testbed2")  # the shipped models that answer right
    # st3's and mustdrop's own defaults get a row in a full run unless budgets were chosen explicitly
    args.own_defaults = args.budgets is None and not args.quick
    for key in ("budgets", "repeats", "new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, DEFAULTS[key][pick])
    if args.samples is None:
        args.samples = DEFAULTS["samples_labelled" if labelled else "samples_other"][pick]
    for key in ("repeats", "new_tokens", "batch", "samples"):
        if getattr(args, key) < 1:
            raise VistrimError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.new_tokens < 2:
        raise VistrimError("--new-tokens must be >= 2 (a time per output token needs two tokens)")
    args.labelled = labelled
    args.out = Path(args.out or default_out(args.model))
    return args


def default_out(model: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model)
    return f"results/bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..bench.specs import default_method_specs, parse_budgets, parse_method_specs
    from ..bench.timing import set_threads

    args = resolve(args)
    set_threads(args.threads)
    specs = parse_method_specs(args.methods or default_method_specs())
    budgets = parse_budgets(args.budgets)
    console = Console()
    with console.status(f"loading {args.model} ..."):
        from ..models import load_model

        model, processor = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)
    document, rows = measure(model, processor, specs, budgets, args)
    write_outputs(console, document, rows, args)
    return 0


def measure(model, processor, specs, budgets, args):
    """Everything that runs the model; returns the JSON document and the aggregated rows."""
    from ..bench.flops import FlopsShape
    from ..bench.report import aggregate, assemble
    from ..bench.runner import config_meta, quality_all, time_all, unpruned_prefill_bytes
    from ..runtime.adapters import adapter_for

    geo = adapter_for(model).geometry
    items, inputs, info, configs, options = plan(model, processor, specs, budgets, args)
    load_start = os.getloadavg()
    raw = {"workload": info, "configs": [config_meta(c) for c in configs]}
    with ProgressBar(len(configs), len(items), options) as advance:
        raw["unpruned_kv_prefill"] = unpruned_prefill_bytes(model, inputs)
        raw["timing"] = time_all(model, inputs, configs, options, advance)
        raw["quality"] = quality_all(model, processor, items, configs, options, advance)
    rows = aggregate(raw, FlopsShape.from_geometry(geo), geo.num_layers)
    settings = run_settings(model, args, budgets, configs, items, options)
    settings["load_average"] = {"start": load_start, "end": os.getloadavg()}
    return assemble(settings, rows, raw), rows


def plan(model, processor, specs, budgets, args):
    """Items (a fixed labelled test subset), the timing inputs and the configuration grid."""
    from ..bench.runner import BenchOptions, workload
    from ..bench.specs import build_configs
    from ..evaluate.harness import default_data, labelled_test_items
    from ..runtime.adapters import adapter_for

    items, _ = labelled_test_items(default_data(args.model), max(args.samples, args.batch))
    inputs, info = workload(model, processor, items, args.batch)
    num_layers = adapter_for(model).geometry.num_layers
    configs = build_configs(specs, budgets, info["visual_tokens"][0], num_layers, args.own_defaults)
    options = BenchOptions(
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        batch=args.batch,
        labelled=args.labelled,
        # the test-bed answers one word; other models get room for a short phrase
        quality_tokens=2 if args.labelled else 8,
        quality_batch=50 if args.labelled else 8,
    )
    return items, inputs, info, configs, options


def run_settings(model, args, budgets, configs, items, options) -> dict:
    from ..bench.runner import environment
    from ..evaluate.harness import default_data

    return {
        "model": args.model,
        **environment(model, args.device, args.dtype),
        "data": f"{default_data(args.model)} test, fixed_subset(seed=0)",
        "budgets": budgets,
        "methods": [f"{c.label} @ {c.budget_label}" for c in configs],
        "samples": len(items),
        "options": vars(options),
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


def write_outputs(console, document: dict, rows: list[dict], args) -> None:
    from rich.console import Console

    from ..bench.report import LEGEND, bench_table, markdown_table, plot_accuracy, plot_speedup

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(document, indent=1, default=str))
    s = document["settings"]
    title = (
        f"{s['model']} | {s['device']} {s['dtype']} {s['attention']} | {s['cpu']}, "
        f"{s['torch_threads']} threads | batch {args.batch}, {args.new_tokens} new tokens, "
        f"median of {args.repeats} | {s['samples']} samples"
    )
    Console(width=max(150, console.width)).print(bench_table(rows, title))
    (args.out / "table.md").write_text(f"{title}\n\n{markdown_table(rows)}\n{LEGEND}\n")
    console.print(f"FLOPs: {s['flops_included']}. Memory: {s['peak_memory_note']}")
    plot_speedup(rows, args.out / "speedup_vs_budget.png", title)
    plot_accuracy(rows, args.out / "accuracy_vs_speedup.png", title)
    console.print(f"wrote {args.out}/bench.json, table.md, speedup_vs_budget.png, accuracy_vs_speedup.png")
