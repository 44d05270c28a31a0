"""``vistrim run``: answer one prompt about one image with a method, and show what it kept."""

from __future__ import annotations

import json

from rich.console import Console

from ..errors import VistrimError
from .common import check_output_file, human_bytes, load_config, make_method, parse_settings


def build_inputs(processor, image, prompt: str):
    """Chat-formatted inputs for one image and one question; a prompt that already holds the
    image placeholder is used as written."""
    token = getattr(processor, "image_token", "<image>")
    if token in prompt:
        if prompt.count(token) != 1:
            raise VistrimError(f"the prompt holds {prompt.count(token)} {token} placeholders for 1 image")
        text = prompt
    elif getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = f"{token}\n{prompt}"
    return processor(images=[image], text=[text], return_tensors="pt")


def run_run(args) -> int:
    # Everything a user typed or points at is checked before torch, transformers or the model load.
    if not args.prompt.strip():
        raise VistrimError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise VistrimError("--max-new-tokens must be >= 1")
    out = check_output_file(args.json, "--json") if args.json else None
    from ..io import load_image

    image = load_image(args.image)
    config = load_config(args.config)
    method = make_method(args.method, config, parse_settings(args.settings))

    import torch

    from ..api import trim
    from ..models import load_model

    console = Console()
    with console.status(f"loading {args.model} ..."):
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)
    inputs = build_inputs(processor, image, args.prompt).to(args.device)
    with console.status(f"generating with {method.describe()} ..."), trim(model, method) as session:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    summary = session.stats.summary()
    report(console, answer.strip(), method, summary)
    if out is not None:
        record = {"model": args.model, "answer": answer, **summary, "settings_schema": method.schema()}
        out.write_text(json.dumps(record, indent=2))
    return 0


def report(console: Console, answer: str, method, s: dict) -> None:
    console.print(f"[bold]answer:[/bold] {answer}")
    console.print(f"[bold]method:[/bold] {method.describe()}")
    if s.get("vision_tokens_per_layer"):
        tower = " ".join(f"{v:g}" for v in s["vision_tokens_per_layer"])
        console.print(f"vision tower tokens per layer (CLS included): {tower}")
    for key, value in s.items():
        if key.startswith("mustdrop_"):
            console.print(f"{key.removeprefix('mustdrop_').replace('_', ' ')}: {value}")
    per_layer = " ".join(f"{v:g}" for v in s["prefill_visual_per_layer"])
    console.print(f"visual tokens per layer, prefill: {per_layer}")
    console.print(f"layer-averaged visual tokens: {s['layer_average_visual']:.1f} of {s['visual_in']:g}")
    if s["cache_visual_final"] != s["cache_visual_after_prefill"]:
        final = " ".join(f"{v:g}" for v in s["cache_visual_final"])
        console.print(f"visual entries per layer in the cache after decoding: {final}")
    for when, key in (("after prefill", "kv_bytes_after_prefill"), ("after decoding", "kv_bytes_final")):
        held, full = s[key], s[f"{key}_unpruned"]
        console.print(
            f"KV cache {when}: {human_bytes(held)} of {human_bytes(full)} unpruned ({held / full:.0%})"
        )
