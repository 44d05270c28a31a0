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
    Console(width=max(100, Console().width)).print(table)
    return 0
