"""Method specs and budgets from the command line, and the method x budget grid they make.

A method spec is ``name`` or ``name:key=value;key=value`` (e.g. ``mustdrop:attention=eager``).
Specs are separated by commas; a comma inside a setting value (``st3:schedule=step;steps=8:0.5,16:0.25``)
stays with its spec because the piece after it does not start with a method name.
A budget is a layer-averaged visual-token budget: ``0.25`` is a ratio, ``64`` a count, ``default``
the method's own settings; ``64:post_cut`` counts it as released code logs it (a pruning layer
counts the tokens left after its cut) instead of what each layer processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..api import at_budget
from ..errors import VistrimError
from ..methods import REGISTRY, Method, build
from ..methods.base import COUNTINGS

DEFAULT = "default"
# Methods whose own defaults are a schedule rather than one budget knob: worth a row of their own.
OWN_DEFAULTS = ("st3", "mustdrop")
PREFERRED = ("none", "random", "fastv", "pdrop", "st3", "mustdrop")
_INT = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class MethodSpec:
    label: str
    name: str
    settings: dict[str, str] = field(default_factory=dict)


def default_method_specs(include_none: bool = False, eager_mustdrop: bool = True) -> str:
    """Every registered method (baselines first), ``none`` only if asked; with ``eager_mustdrop``
    also MustDrop scoring on materialised attention (its released code's way) when registered."""
    names = sorted(REGISTRY, key=lambda n: (PREFERRED.index(n) if n in PREFERRED else len(PREFERRED), n))
    if not include_none:
        names.remove("none")
    if eager_mustdrop and "mustdrop" in REGISTRY:
        names.append("mustdrop:attention=eager")
    return ",".join(names)


def parse_method_specs(text: str) -> list[MethodSpec]:
    pieces: list[str] = []
    for piece in text.split(","):
        head = piece.split(":", 1)[0].strip()
        if pieces and ":" in pieces[-1] and head not in REGISTRY:
            pieces[-1] += "," + piece  # a comma inside the previous spec's setting value
        else:
            pieces.append(piece)
    specs = [parse_method_spec(piece) for piece in pieces if piece.strip()]
    if not specs:
        raise VistrimError("--methods is empty")
    return specs


def parse_method_spec(text: str) -> MethodSpec:
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in REGISTRY:
        raise VistrimError(f"unknown method {name!r} in {text.strip()!r} (available: {', '.join(REGISTRY)})")
    settings = {}
    for pair in filter(str.strip, rest.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VistrimError(f"method spec {text.strip()!r}: settings are key=value separated by ';'")
        settings[key.strip()] = value.strip()
    build(name, **settings)  # type-check now: a bad value fails before any model is loaded
    return MethodSpec(text.strip(), name, settings)


def parse_budgets(text: str) -> list[int | float | str]:
    budgets: list[int | float | str] = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        budgets.append(parse_budget(piece))
    if not budgets:
        raise VistrimError("--budgets is empty")
    return budgets


def parse_budget(text: str) -> int | float | str:
    if text == DEFAULT:
        return DEFAULT
    value, sep, counting = text.partition(":")
    if sep:
        if value.strip() == DEFAULT or counting.strip() not in COUNTINGS:
            raise VistrimError(
                f"bad budget {text!r}: counted {counting.strip()!r}, not one of {', '.join(COUNTINGS)}"
            )
        return f"{parse_budget(value.strip())}:{counting.strip()}"
    try:
        value: int | float = int(text) if _INT.match(text) else float(text)
    except ValueError:
        raise VistrimError(f"bad budget {text!r}: a ratio like 0.25, a count like 64, or default") from None
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise VistrimError(f"bad budget {text!r}: a ratio must be in (0, 1] (an integer is a count)")
    if isinstance(value, int) and value < 1:
        raise VistrimError(f"bad budget {text!r}: a count must be >= 1")
    return value


@dataclass
class Config:
    """One row of a benchmark or evaluation: a configured method and the budgets it stands for."""

    label: str
    name: str
    method: Method
    budgets: list = field(default_factory=list)

    @property
    def budget_label(self) -> str:
        return ",".join(str(b) for b in self.budgets) or "-"


def build_configs(
    specs: list[MethodSpec], budgets: list, n_visual: int, num_layers: int, own_defaults: bool = True
) -> list[Config]:
    """The method x budget grid. ``none`` gets one row; methods in OWN_DEFAULTS also get a
    ``default`` row when ``own_defaults``; configurations that resolve to the same settings are
    merged into one row listing every budget they stand for."""
    rows: dict[tuple, Config] = {}
    for spec in specs:
        wanted = [DEFAULT] if spec.name == "none" else list(budgets)
        if own_defaults and spec.name in OWN_DEFAULTS and DEFAULT not in wanted:
            wanted.append(DEFAULT)
        for budget in wanted:
            method = configure(spec, budget, n_visual, num_layers)
            key = (spec.label, repr(sorted(method.settings().items())))
            row = rows.setdefault(key, Config(spec.label, spec.name, method))
            row.budgets.append(budget if spec.name != "none" else "-")
    return list(rows.values())


def configure(spec: MethodSpec, budget, n_visual: int, num_layers: int) -> Method:
    if budget == DEFAULT:
        return build(spec.name, **spec.settings)
    counting = "processed"
    if isinstance(budget, str):  # "64:post_cut"
        text, counting = budget.split(":")
        budget = int(text) if _INT.match(text) else float(text)
    return at_budget(
        spec.name, budget, n_visual=n_visual, num_layers=num_layers, counting=counting, **spec.settings
    )
