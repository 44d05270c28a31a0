"""``vistrim list``: every method, its idea in one line, its settings (type, default, bounds, help)."""

from __future__ import annotations

from rich.console import Console

from ..methods import REGISTRY


def setting_lines(cls) -> list[str]:
    """One line per setting: name: type = default (bounds)  help (from the method's field metadata)."""
    lines = []
    for entry in cls.schema():
        bounds = f" ({entry['bounds']})" if entry["bounds"] else ""
        head = f"{entry['name']}: {entry['type']} = {entry['default']!r}{bounds}"
        lines.append(f"{head:<44} {entry['help']}".rstrip())
    return lines


def run_list(args) -> int:
    console = Console(width=max(100, Console().width))
    console.print("[bold]methods[/bold] (settings: type = default (bounds)  help; set with --set key=value)")
    for name, cls in REGISTRY.items():
        console.print(f"{name}: {cls.summary}", markup=False, highlight=False)
        for line in setting_lines(cls) or ["(no settings)"]:
            console.print(f"    {line}", markup=False, highlight=False, overflow="fold")
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
