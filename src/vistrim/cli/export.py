"""``vistrim export-task``: a benchmark as a local lmms-eval task (data file + the packaged YAML)."""

from __future__ import annotations

from pathlib import Path


def add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export-task",
        help="write a local lmms-eval task (easy-vqa or test-bed 2's shapes) for `lmms_eval --include_path`",
    )
    export.add_argument(
        "name", choices=["easyvqa", "shapes"], help="the data set: easyvqa, or shapes (test-bed 2's test)"
    )
    export.add_argument("--out", required=True, help="folder for the task YAML and its data file")
    export.add_argument("--limit", type=int, help="a fixed seeded subset of this many test questions")
    export.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0, as vistrim eval)")


def run_export(args) -> int:
    from rich.console import Console

    from ..errors import VistrimError
    from .common import check_output_dir

    if args.limit is not None and args.limit < 1:
        raise VistrimError(f"--limit must be >= 1, got {args.limit}")
    check_output_dir(args.out, "--out")
    from ..integrations.lmms_eval.task import export_task

    with Console().status(f"exporting {args.name} ..."):
        yaml_path, data_path, count = export_task(args.name, Path(args.out), limit=args.limit, seed=args.seed)
    task = yaml_path.stem
    print(f"wrote {yaml_path} and {data_path} ({count} questions); task name: {task}")
    print(f"run: lmms_eval --include_path {args.out} --tasks {task} --model vistrim_llava_hf ...")
    return 0
