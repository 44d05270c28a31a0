"""``vistrim eval``: accuracy per method x budget on labelled questions (easy-vqa, or the shapes-on-photos
test split for ``testbed2``), or with ``--fidelity`` agreement with the unpruned model on any images
and prompts (no labels)."""

from __future__ import annotations

import argparse
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import VistrimError
from .bench import add_threads_arg
from .common import add_model_args


def add_eval_parser(commands) -> None:
    ev = commands.add_parser(
        "eval", help="accuracy (easy-vqa) or fidelity to the unpruned model per method x budget"
    )
    add_model_args(ev)
    ev.add_argument("--methods", help="comma list of name or name:key=value;key=value (default: all)")
    ev.add_argument("--budgets", help="layer-averaged visual budgets: ratios, counts or 'default'")
    ev.add_argument("--limit", type=int, help="items (or image x prompt pairs) to use (default 500, all)")
    ev.add_argument("--batch-size", type=int, default=50, help="prompts per generate (default 50)")
    ev.add_argument("--max-new-tokens", type=int, help="answer length (default 2 labelled, 16 fidelity)")
    ev.add_argument(
        "--instruction",
        help="text on a line after each easy-vqa question (default: none for testbed/tiny, "
        "LLaVA-1.5's 'Answer the question using a single word or phrase.' otherwise)",
    )
    ev.add_argument(
        "--data",
        choices=("easy-vqa", "shapes"),
        help="labelled questions: easy-vqa test, or shapes on photos (test split of test-bed 2); "
        "default: shapes for testbed2, easy-vqa otherwise",
    )
    ev.add_argument(
        "--ablate",
        choices=("none", "blank", "background"),
        default="none",
        help="replace every image: uniform gray (blank) or, for shapes, the photo without its shapes",
    )
    ev.add_argument("--out", help="output folder (default results/eval-<model>-<timestamp>)")
    ev.add_argument("--fidelity", action="store_true", help="compare with the unpruned model, no labels")
    ev.add_argument("--images", nargs="+", help="--fidelity: image files and/or folders")
    ev.add_argument("--prompts", help="--fidelity: file with one prompt per line")
    ev.add_argument("--prompt", help="--fidelity: one prompt")
    add_threads_arg(ev)


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.batch_size < 1:
        raise VistrimError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise VistrimError(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.fidelity else 2
    if args.max_new_tokens < 1:
        raise VistrimError("--max-new-tokens must be >= 1")
    if args.fidelity and not args.images:
        raise VistrimError("--fidelity needs --images FILE_OR_FOLDER ...")
    if not args.fidelity and (args.images or args.prompts or args.prompt):
        raise VistrimError("--images/--prompts/--prompt belong to --fidelity mode")
    if args.fidelity and (args.data is not None or args.ablate != "none"):
        raise VistrimError("--data/--ablate belong to labelled mode, not --fidelity")
    if args.data is None:
        from ..evaluate.harness import default_data

        args.data = default_data(args.model)
    if args.ablate == "background" and args.data != "shapes":
        raise VistrimError("--ablate background needs --data shapes (easy-vqa images have no photo)")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(args.model.rstrip("/")).name or args.model)
    args.out = Path(args.out or f"results/eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def run_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..bench.specs import default_method_specs, parse_budgets, parse_method_specs
    from ..bench.timing import set_threads

    args = check_args(args)
    set_threads(args.threads)
    specs = parse_method_specs(args.methods or default_method_specs(include_none=True, eager_mustdrop=False))
    budgets = parse_budgets(args.budgets or "0.33,0.22,0.11")
    batches = fidelity_batches(args) if args.fidelity else None  # bad paths fail before loading
    console = Console()
    with console.status(f"loading {args.model} ..."):
        from ..models import load_model

        model, processor = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)
    if args.fidelity:
        document = evaluate_fidelity(model, processor, batches, specs, budgets, args)
    else:
        document = evaluate_accuracy(model, processor, specs, budgets, args)
    write_outputs(console, document, args)
    return 0


def fidelity_batches(args) -> list:
    from ..evaluate.fidelity import collect_images, pair_batches, pair_up, read_prompts
    from ..io import load_image

    files = collect_images(args.images)
    prompts = read_prompts(args.prompts, args.prompt)
    images = [load_image(f) for f in files]
    pairs = pair_up(images, prompts, args.limit)
    args.pairs = [(str(f), p) for f in files for p in prompts][: len(pairs)]
    return pair_batches(pairs, args.batch_size)


def grid(model, processor, first_batch, specs, budgets, args):
    """The method x budget configurations for this model's visual-token count and depth."""
    from ..bench.specs import build_configs
    from ..evaluate.harness import encode, visual_counts
    from ..runtime.adapters import adapter_for

    images, prompts = first_batch
    n_visual = int(visual_counts(model, encode(processor, images[:1], prompts[:1], model))[0])
    return build_configs(
        specs, budgets, n_visual, adapter_for(model).geometry.num_layers, args.budgets is None
    )


@contextmanager
def progress(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with bar:
        task = bar.add_task(label, total=total)

        def advance(n: int, what: str | None = None) -> None:
            bar.update(task, advance=n, description=what or label)

        yield advance


def run_grid(model, processor, batches, configs, max_new_tokens: int, n_items: int):
    """Answers of the plain model, then of every configuration, under one progress bar."""
    from ..evaluate.harness import answer

    results = []
    with progress(n_items * (len(configs) + 1), "eval") as advance:
        for config in [None, *configs]:
            name = "unpruned" if config is None else f"{config.label} @ {config.budget_label}"
            method = None if config is None else config.method
            tick = lambda n, name=name: advance(n, f"eval: {name}")  # noqa: E731
            results.append(answer(model, processor, batches, method, max_new_tokens, tick))
    return results


def meta(config) -> dict:
    from ..bench.runner import config_meta

    if config is None:
        return {"label": "unpruned", "method": None, "budgets": [], "settings": {}}
    return config_meta(config)


def image_source(ablate: str):
    """Item -> image: the item's own, a uniform gray one of the same size, or its bare photo."""
    from PIL import Image

    from ..data.easyvqa import BLANK_COLOR
    from ..data.shapes import render
    from ..evaluate.harness import item_image

    if ablate == "blank":
        return lambda item: Image.new("RGB", item_image(item).size, BLANK_COLOR)
    if ablate == "background":
        return lambda item: render(item.scene, "background")
    return item_image


def evaluate_accuracy(model, processor, specs, budgets, args) -> dict:
    from ..evaluate.harness import config_summary, default_instruction, item_batches, labelled_test_items

    items, data = labelled_test_items(args.data, args.limit or 500)
    if args.instruction is None:
        args.instruction = default_instruction(args.model)
    batches = item_batches(items, args.batch_size, args.instruction, image_source(args.ablate))
    configs = grid(model, processor, batches[0], specs, budgets, args)
    answers = run_grid(model, processor, batches, configs, args.max_new_tokens, len(items))
    reference = config_summary(items, answers[0].texts, answers[0].reached, 0.0)
    rows = []
    for config, result in zip([None, *configs], answers):
        summary = config_summary(items, result.texts, result.reached, reference["accuracy"])
        rows.append({**meta(config), **summary, "batch_stats": result.batches})
    if args.ablate != "none":
        data += f", images replaced ({args.ablate})"
    settings = eval_settings(model, args, configs, len(items), data)
    return {"mode": "accuracy", "settings": settings, "rows": rows}


def evaluate_fidelity(model, processor, batches, specs, budgets, args) -> dict:
    from ..evaluate.fidelity import fidelity_summary
    from ..evaluate.harness import mean

    configs = grid(model, processor, batches[0], specs, budgets, args)
    n_items = sum(len(prompts) for _, prompts in batches)
    answers = run_grid(model, processor, batches, configs, args.max_new_tokens, n_items)
    ref = answers[0]
    rows = []
    for config, result in zip([None, *configs], answers):
        summary = fidelity_summary(ref.texts, ref.first_logits, result.texts, result.first_logits)
        reached = {"layer_average_visual": mean(result.reached), "reached_per_sample": result.reached}
        rows.append(
            {**meta(config), **summary, **reached, "answers": result.texts, "batch_stats": result.batches}
        )
    settings = eval_settings(model, args, configs, n_items, "image x prompt pairs")
    settings["pairs"] = args.pairs
    return {"mode": "fidelity", "settings": settings, "rows": rows}


def eval_settings(model, args, configs, n_items: int, data: str) -> dict:
    from ..bench.runner import environment

    return {
        "model": args.model,
        **environment(model, args.device, args.dtype),
        "data": data,
        "samples": n_items,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "instruction": getattr(args, "instruction", None),
        "greedy": True,
        "budgets": args.budgets or "0.33,0.22,0.11",
        "methods": [meta(c) for c in configs],
    }


def write_outputs(console, document: dict, args) -> None:
    from rich.console import Console

    from ..evaluate.report import accuracy_table, fidelity_table, plot_by_size, plot_vs_budget, size_table

    wide = Console(width=max(120, console.width))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(document, indent=1, default=str))
    s, rows = document["settings"], document["rows"]
    title = f"{s['model']} | {s['device']} {s['dtype']} {s['attention']} | {s['samples']} samples, greedy"
    if document["mode"] == "accuracy":
        wide.print(accuracy_table(rows, title))
        plot_vs_budget(rows, "accuracy", "accuracy", args.out / "accuracy_vs_budget.png", title)
        names = "eval.json, accuracy_vs_budget.png"
        if any("by_size" in r for r in rows):
            wide.print(size_table(rows, f"accuracy by object size (patches) | {title}"))
            plot_by_size(rows, args.out / "accuracy_by_size.png", title)
            names += ", accuracy_by_size.png"
    else:
        wide.print(fidelity_table(rows, title))
        ylabel = "answers identical to unpruned"
        plot_vs_budget(rows, "identical", ylabel, args.out / "fidelity_vs_budget.png", title)
        names = "eval.json, fidelity_vs_budget.png"
    console.print(f"wrote {args.out}/{names}")
