"""``vistrim eval``: accuracy per method x budget on labelled questions (easy-vqa, or the
shapes-on-photos test split for ``testbed2``), or with ``--fidelity`` agreement with the unpruned
model on any images and prompts (no labels). The work is
``vistrim.evaluate.suite`` (callable from Python); this module parses and checks the arguments."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from ..errors import VistrimError
from .bench import add_threads_arg, check_threads
from .common import add_method_args, add_model_args, check_output_dir, selected_specs


def add_eval_parser(commands) -> None:
    ev = commands.add_parser(
        "eval", help="accuracy (easy-vqa) or fidelity to the unpruned model per method x budget"
    )
    add_model_args(ev)
    ev.add_argument("--methods", help="comma list of name or name:key=value;key=value (default: all)")
    add_method_args(ev, several=True)
    ev.add_argument(
        "--budgets",
        help="layer-averaged visual budgets: ratios, counts, 'default'; 64:post_cut counts post-cut",
    )
    ev.add_argument(
        "--limit",
        "--samples",
        dest="limit",
        type=int,
        help="items (or image x prompt pairs) to use (default 500, all)",
    )
    ev.add_argument(
        "--batch-size",
        "--batch",
        dest="batch_size",
        type=int,
        default=50,
        help="prompts per generate (default 50)",
    )
    ev.add_argument(
        "--max-new-tokens",
        "--new-tokens",
        dest="max_new_tokens",
        type=int,
        help="answer length (default 2 labelled, 16 fidelity)",
    )
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


def check_args(args: argparse.Namespace):
    """The run's plan, every option checked (before torch loads)."""
    from ..evaluate.suite import EvalPlan

    plan = EvalPlan(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        budgets=args.budgets,
        samples=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=(16 if args.fidelity else 2) if args.max_new_tokens is None else args.max_new_tokens,
        instruction=args.instruction,
        data=args.data,
        ablate=args.ablate,
    ).check()
    check_threads(args.threads)
    if args.fidelity and not args.images:
        raise VistrimError("--fidelity needs --images FILE_OR_FOLDER ...")
    if not args.fidelity and (args.images or args.prompts or args.prompt):
        raise VistrimError("--images/--prompts/--prompt belong to --fidelity mode")
    if args.fidelity and (args.data is not None or args.ablate != "none"):
        raise VistrimError("--data/--ablate belong to labelled mode, not --fidelity")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(args.model.rstrip("/")).name or args.model)
    args.out = check_output_dir(args.out or f"results/eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    return plan


def run_eval(args: argparse.Namespace) -> int:
    plan = check_args(args)  # options and the output folder are checked before torch loads
    from rich.console import Console

    from ..bench.specs import default_method_specs
    from ..bench.timing import set_threads
    from ..evaluate import suite

    set_threads(args.threads)
    specs = selected_specs(
        args.methods or default_method_specs(include_none=True, eager_mustdrop=False), args
    )
    suite.specs_and_budgets(specs, plan)  # bad budgets fail before loading
    batches = None
    if args.fidelity:  # bad paths fail before loading
        batches, plan = suite.fidelity_batches(args.images, args.prompts, args.prompt, plan)
    console = Console()
    with console.status(f"loading {args.model} ..."):
        from ..models import load_model

        model, processor = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)
    if args.fidelity:
        document = suite.evaluate_fidelity(model, processor, batches, specs, plan)
    else:
        document = suite.evaluate_accuracy(model, processor, specs, plan)
    suite.write_outputs(document, args.out, console)
    return 0
