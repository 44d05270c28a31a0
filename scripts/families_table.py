"""What every method does on every family's tiny model: visual tokens in, layer-averaged visual
tokens reached, KV cache after prefill (ratio to unpruned), whether MustDrop's vision stage ran,
and whether keep-all settings reproduce the unpatched greedy tokens.

    python scripts/families_table.py [--out docs/results/families.md]

Tiny random models built from configs (no hub, no weights): the numbers show that each method
runs and meets its budget on each family's token layout, not speed or accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vistrim
from vistrim.families import FAMILIES

METHODS = [
    ("random", {"keep": 0.25}),
    ("fastv", {"keep": 0.25}),
    ("pdrop", {}),
    ("st3", {}),
    ("mustdrop", {}),
    ("mustdrop", {"budget": 0.3}),
]


QUESTIONS = [("what color is the shape ?", (32, 32)), ("describe it", (40, 24))]
HEADER = (
    "| variant | method | visual in | layer-avg visual | KV after prefill | vision stage | keep-all = unpatched |"  # noqa: E501
    "\n"
    "|---|---|---|---|---|---|---|"
)


def inputs_for(processor):
    """Two prompts with images of different sizes, left-padded."""
    processor.tokenizer.padding_side = "left"
    texts, pictures = [], []
    for i, (question, size) in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        rng = np.random.default_rng(i)
        pictures.append(Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")))
    return dict(processor(images=pictures, text=texts, return_tensors="pt", padding=True))


def generate(model, batch, method=None, **settings):
    """Greedy tokens, and the session's summary when a method ran."""
    if method is None:
        return model.generate(**batch, max_new_tokens=4, do_sample=False), None
    with vistrim.trim(model, method, **settings) as session:
        output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    return output, session.stats.summary()


def row(name: str, model, batch, reference, method: str, settings: dict) -> str:
    _, summary = generate(model, batch, method, **settings)
    keep_all = type(vistrim.build(method)).keep_all_settings
    same = ""
    if keep_all is not None:
        same = "yes" if torch.equal(generate(model, batch, method, **keep_all)[0], reference) else "**no**"
    stage = summary.get("mustdrop_vision_stage") if method == "mustdrop" else None
    kv, base_kv = summary["kv_bytes_after_prefill"], summary["kv_bytes_after_prefill_unpruned"]
    label = ":".join([method, *(f"{k}={v}" for k, v in settings.items())])
    return (
        f"| {name} | {label} | {summary['visual_in']:.1f} | {summary['layer_average_visual']:.1f} | "
        f"{kv / base_kv:.0%} | {'' if stage is None else ('yes' if stage else 'no')} | {same} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [HEADER]
    for family in FAMILIES.values():
        for name, build in family.tiny_variants().items():
            missing = [m for m in family.tiny_requires if importlib.util.find_spec(m) is None]
            if missing:
                lines.append(f"| {name} | (not built here: needs {', '.join(missing)}) | | | | | |")
                continue
            model, processor = build(seed=0)
            batch = inputs_for(processor)
            with torch.no_grad():
                reference, _ = generate(model, batch)
                lines += [row(name, model, batch, reference, m, s) for m, s in METHODS]
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
