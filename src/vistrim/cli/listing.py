"""``vistrim list``: every method, its idea in one line, its settings with defaults."""

from __future__ import annotations

import dataclasses
import typing

from rich.console import Console
from rich.table import Table

from ..methods import REGISTRY


def type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    return {
        "<class 'int'>": "int",
        "<class 'float'>": "float",
        "<class 'str'>": "str",
        "<class 'bool'>": "bool",
    }.get(text, text.replace("Union[int, float]", "ratio|count").replace("int | float", "ratio|count"))


def run_list(args) -> int:
    table = Table(title="vistrim methods", show_lines=True)
    table.add_column("method", style="bold")
    table.add_column("idea")
    table.add_column("settings (default)")
    for name, cls in REGISTRY.items():
        hints = typing.get_type_hints(cls)
        fields = [f"{f.name}: {type_name(hints[f.name])} = {f.default!r}" for f in dataclasses.fields(cls)]
        table.add_row(name, cls.summary, "\n".join(fields) or "-")
    console = Console(width=max(100, Console().width))
    console.print(table)
    console.print("[bold]model families[/bold] (chosen by the model's class)")
    for line in family_lines():
        console.print(line, highlight=False)
    return 0


def family_lines() -> list[str]:
    """One line per supported family (its model classes, the transformers releases it was tested
    on, what it supports), then one per refused class with the reason."""
    from ..families import FAMILIES, REFUSED

    lines = []
    for family in FAMILIES.values():
        vision = "yes" if not family.vision_refusal else f"no ({family.vision_refusal})"
        lines.append(
            f"- {family.name}: {', '.join(family.model_classes)}; tested with transformers "
            f"{', '.join(family.tested_transformers)}; videos: {'yes' if family.videos else 'no'}; "
            f"renumber: {'yes' if family.renumber else 'no'}; vision stage: {vision}"
        )
    lines += [f"- refused: {name}: {reason}" for name, reason in REFUSED.items()]
    return lines
