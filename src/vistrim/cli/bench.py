"""``vistrim bench``: speed, compute, memory and quality of every method x budget against the
unpruned model, measured interleaved in one process (specs/measurement.md). The work is
``vistrim.bench.suite`` (callable from Python); this module parses and checks the arguments."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from ..errors import VistrimError
from .common import add_method_args, add_model_args, check_output_dir, selected_specs


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="speed-up, FLOPs, KV memory and accuracy per method x budget")
    add_model_args(bench)
    bench.add_argument("--methods", help="comma list of name or name:key=value;key=value (default: all)")
    add_method_args(bench, several=True)
    bench.add_argument(
        "--budgets",
        help="layer-averaged visual budgets: ratios, counts, 'default'; 64:post_cut counts post-cut",
    )
    bench.add_argument(
        "--max-new-tokens",
        "--new-tokens",
        dest="max_new_tokens",
        type=int,
        help="tokens generated per timed run (default 64)",
    )
    bench.add_argument("--repeats", type=int, help="timed repeats, median reported (default 5)")
    bench.add_argument(
        "--batch-size",
        "--batch",
        dest="batch_size",
        default="1",
        help="prompts per timed generate: one size or a list (1,8,32: throughput per batch size; "
        "the main table at the smallest; default 1)",
    )
    bench.add_argument(
        "--kv-budget",
        help="KV-cache budget: bytes (512MB, 2GiB) or a multiple of the unpruned cache of one sequence "
        "(8x: what 8 unpruned sequences hold); reports the largest batch each method fits and its "
        "throughput there",
    )
    bench.add_argument(
        "--samples",
        "--limit",
        dest="samples",
        type=int,
        help="labelled test items answered for accuracy/fidelity (testbed2: its own shapes split; "
        "0: timing only)",
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


def check_threads(threads: int) -> None:
    """--threads: 1 to the number of logical CPUs (more only adds spinning threads)."""
    cpus = os.cpu_count() or 1
    if threads < 1:
        raise VistrimError(f"--threads must be >= 1, got {threads}")
    if threads > cpus:
        raise VistrimError(f"--threads must be <= {cpus} (the logical CPUs), got {threads}")


def resolve(args: argparse.Namespace):
    """The run's plan (unset options from the full or quick defaults), all options checked."""
    from ..bench.suite import BenchPlan

    plan = BenchPlan.resolve(
        args.model,
        quick=args.quick,
        budgets=args.budgets,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        kv_budget=args.kv_budget,
    )
    check_threads(args.threads)
    args.out = check_output_dir(args.out or default_out(args.model), "--out")
    return plan


def default_out(model: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model)
    return f"results/bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_bench(args: argparse.Namespace) -> int:
    plan = resolve(args)  # options and the output folder are checked before torch loads
    from rich.console import Console

    from ..bench.specs import default_method_specs, parse_budgets
    from ..bench.suite import bench, write_outputs
    from ..bench.timing import set_threads

    specs = selected_specs(args.methods or default_method_specs(), args)
    budgets = parse_budgets(plan.budgets)
    set_threads(args.threads)
    console = Console()
    with console.status(f"loading {args.model} ..."):
        from ..models import load_model

        model, processor = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)
    document, rows = bench(model, processor, specs, plan, budgets)
    write_outputs(document, rows, plan, args.out, console)
    if args.model == "testbed" and plan.labelled and plan.samples:
        console.print(
            "accuracy on this test-bed does not rank the methods (a few tokens carry its one flat shape); "
            "for a ranking at LLaVA-1.5 geometry: vistrim bench --model testbed2 (about 13 min) or "
            "vistrim eval --model testbed2 (about 6 min)",
            highlight=False,
        )
    return 0
