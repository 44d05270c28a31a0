"""``vistrim show``: one answer, and a PNG of the visual tokens each layer kept (plus a JSON of it)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_method_args, add_model_args


def add_show_parser(commands) -> None:
    show = commands.add_parser("show", help="a PNG of the visual tokens each layer keeps, and the answer")
    add_model_args(show)
    show.add_argument("--image", required=True, help="image file")
    show.add_argument("--prompt", required=True, help="question about the image")
    show.add_argument("--method", default="none", help="method name (see `vistrim list`)")
    add_method_args(show)
    show.add_argument("--max-new-tokens", type=int, default=16)
    show.add_argument("--max-panels", type=int, default=8, help="panels per section at most (default 8)")
    show.add_argument("--out", help="PNG to write (default show-<method>.png); a JSON goes next to it")


def run_show(args) -> int:
    from rich.console import Console

    from ..errors import VistrimError
    from .common import check_output_file, load_config, make_method, parse_settings

    # Everything a user typed or points at is checked before torch, transformers or the model load.
    if not args.prompt.strip():
        raise VistrimError("the prompt is empty")
    if args.max_new_tokens < 1 or args.max_panels < 2:
        raise VistrimError("--max-new-tokens must be >= 1 and --max-panels >= 2")
    out = Path(args.out or f"show-{args.method}.png")
    if out.suffix.lower() != ".png":
        raise VistrimError(f"--out must name a .png file, got {out}")
    out = check_output_file(out, "--out")
    check_output_file(out.with_suffix(".json"), "--out")
    from ..io import load_image

    image = load_image(args.image)
    method = make_method(args.method, load_config(args.config), parse_settings(args.settings))
    from ..models import load_model
    from ..show import show
    from .run import build_inputs

    console = Console()
    with console.status(f"loading {args.model} ..."):
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)
    inputs = build_inputs(processor, image, args.prompt).to(args.device)
    with console.status(f"generating with {method.describe()} ..."):
        shown = show(
            model,
            processor,
            inputs,
            image,
            method,
            max_new_tokens=args.max_new_tokens,
            max_panels=args.max_panels,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    shown.picture.save(out)
    record = {"model": args.model, "image": str(args.image), "prompt": args.prompt, **shown.record()}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    console.print(f"[bold]answer:[/bold] {shown.answer}")
    console.print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
