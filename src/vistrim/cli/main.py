"""The ``vistrim`` command: list | run | show | eval | bench | export-task.

Parsing imports neither torch nor transformers (seconds of start-up): ``--help`` and usage errors
answer at once, and each command imports what it needs once its arguments are checked.
"""

from __future__ import annotations

import os
import sys
import warnings

from ..errors import VistrimError
from .bench import add_bench_parser
from .common import Parser, add_method_args, add_model_args, fail
from .eval import add_eval_parser
from .export import add_export_parser
from .show import add_show_parser


def build_parser() -> Parser:
    parser = Parser(prog="vistrim", description="Training-free visual-token trimming for multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    commands.add_parser("list", help="methods, their idea and their settings")

    run = commands.add_parser("run", help="answer one prompt about one image with a method")
    add_model_args(run)
    run.add_argument("--image", required=True, help="image file")
    run.add_argument("--prompt", required=True, help="question about the image")
    run.add_argument("--method", default="none", help="method name (see `vistrim list`)")
    add_method_args(run)
    run.add_argument(
        "--max-new-tokens",
        "--new-tokens",
        dest="max_new_tokens",
        type=int,
        default=32,
        help="answer length (default 32)",
    )
    run.add_argument("--json", help="also write the answer and statistics to this JSON file")

    add_show_parser(commands)
    add_eval_parser(commands)
    add_bench_parser(commands)
    add_export_parser(commands)
    return parser


def quiet_libraries() -> None:
    """No progress bars or warnings from transformers and the hub client: the CLI reports with its
    own progress bars and one-line errors. Environment variables reach them when they are imported
    later; when they already are (``main`` called in-process), they are told directly."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        if args.command in ("run", "show", "eval", "bench"):
            from ..compat import check_transformers

            check_transformers()  # before any model is loaded
        if args.command == "list":
            from .listing import run_list

            return run_list(args)
        if args.command == "run":
            from .run import run_run

            return run_run(args)
        if args.command == "show":
            from .show import run_show

            return run_show(args)
        if args.command == "export-task":
            from .export import run_export

            return run_export(args)
        if args.command == "eval":
            from .eval import run_eval

            return run_eval(args)
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args)
    except VistrimError as error:
        return fail(str(error))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as error:  # the CLI never shows a traceback unless asked to
        if os.environ.get("VISTRIM_DEBUG"):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return fail(f"internal error: {type(error).__name__}: {first} (set VISTRIM_DEBUG=1 for details)", 1)
    return fail(f"unknown command {args.command}")


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """vistrim's own warnings as one line (``vistrim: warning: ...``), others as Python shows them."""
    from ..compat import VistrimWarning

    if issubclass(category, VistrimWarning):
        print(f"vistrim: warning: {message}", file=sys.stderr)
        return
    _default_showwarning(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    sys.exit(main())
