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
    console.print(families_table())
    return 0


def families_table() -> Table:
    """Supported model families (chosen by model class), the transformers releases they were
    tested on, and what each supports; then the classes refused, with the reason."""
    from ..families import FAMILIES, REFUSED

    table = Table(title="model families", show_lines=True)
    for column in ("family", "model classes", "tested transformers", "videos", "vision stage", "renumber"):
        table.add_column(column, overflow="fold")
    for family in FAMILIES.values():
        table.add_row(
            family.name,
            "\n".join(family.model_classes),
            ", ".join(family.tested_transformers),
            "yes" if family.videos else "no",
            "yes" if not family.vision_refusal else f"no: {family.vision_refusal}",
            "yes" if family.renumber else "no",
        )
    for name, reason in REFUSED.items():
        table.add_row("-", name, "-", "-", f"refused: {reason}", "-")
    return table
