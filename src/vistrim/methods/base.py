"""The method API: one dataclass per method, fields = hyper-parameters, a registry of names.

A method *scores and decides*; the runtime removes. Methods that cut visual tokens at a few
prefill layers by a score subclass ``ScorerMethod`` (``methods/scorer.py``) and write only
``score()`` and their schedule. Others override the hooks they need:

- ``prefill_layers(geo)`` / ``on_prefill_layer(ctx, layer)``: after those decoder layers have run
  in prefill, e.g. ``ctx.keep_top(scores, counts)`` to cut visual tokens for all deeper layers;
- ``on_prefill_end(ctx)``: after the whole prefill, e.g. evict entries from any layer's cache;
- ``decode_layers(geo)`` / ``on_decode_layer(ctx, layer)``: after those layers ran in a
  decoding step, e.g. ``ctx.evict_top(layer, scores, counts)``;
- ``on_decode_end(ctx)``: after a whole decoding step, e.g. one selection for every layer
  scored during the step (``ctx.evict_top_layers``): no layer reads another's cache after it ran.

Settings are data: each field's type, bounds and one-line help are declared on the field
(``Annotated[int, Field(ge=1, description=...)]``) and checked by pydantic when a method is built;
``schema()`` returns them for ``vistrim list`` and for every result file. Command-line strings
(``--set``, method specs) are parsed here first: ``none``, lists (``2,6,10``, ``8:0.5,16:0.25``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Collection
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from ..errors import VistrimError

Count = Annotated[int, Field(ge=0)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Budget = Union[Count, Ratio]  # noqa: UP007  (a float is a ratio of the visual tokens, an int a count)
# How a layer-averaged visual-token count is taken: ``processed`` (vistrim's: what each layer
# processes) or ``post_cut`` (how MustDrop's and others' released code log it: a pruning layer
# counts the tokens left after its cut).
Counting = Literal["processed", "post_cut"]
COUNTINGS = get_args(Counting)
INT64 = 2**63


@dataclasses.dataclass
class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Settings under which the method keeps every visual token, and settings that prune on a tiny
    # model: the test matrix runs every registered method with both (None: not in the matrix).
    keep_all_settings: ClassVar[dict | None] = None
    pruning_settings: ClassVar[dict | None] = None

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in check_settings(type(self), values).items():
            setattr(self, key, value)
        self.validate()

    # ------------------------------------------------------------------ to override
    def validate(self) -> None:
        """Check relations between fields (single-field bounds are declared on the fields);
        raise ``VistrimError`` with a one-line message."""

    def bind(self, geo) -> None:
        """Check settings against the model's geometry (e.g. layer indices within its depth)."""

    def prefill_layers(self, geo) -> Collection[int]:
        return ()

    def decode_layers(self, geo) -> Collection[int]:
        return ()

    def install(self, session) -> None:
        """Extra hooks outside the decoder (e.g. on the vision tower); register via session.add_handle."""

    def uninstall(self, session) -> None:
        """Undo anything ``install`` did besides registered hooks."""

    def on_prefill_start(self, ctx) -> None:
        pass

    def on_prefill_layer(self, ctx, layer: int) -> None:
        pass

    def on_prefill_end(self, ctx) -> None:
        pass

    def on_decode_layer(self, ctx, layer: int) -> None:
        pass

    def on_decode_end(self, ctx) -> None:
        pass

    # ------------------------------------------------------------------ budgets
    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        """Visual tokens each decoder layer processes in prefill for a prompt with ``n_visual``
        (exact for methods whose counts do not depend on the data)."""
        raise VistrimError(f"method {self.name!r} cannot predict its token counts")

    def at_budget(
        self, target: float, n_visual: int, num_layers: int, counting: Counting = "processed"
    ) -> Method:
        """A copy whose layer-averaged prefill visual tokens, counted the ``counting`` way, come
        closest to ``target`` tokens."""
        raise VistrimError(f"method {self.name!r} has no budget mode")

    # ------------------------------------------------------------------ shared
    def settings(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{self.name}({args})"

    @classmethod
    def schema(cls) -> list[dict[str, Any]]:
        """Every setting as data: name, type, default, bounds and one-line help."""
        hints = _hints(cls)
        return [
            {
                "name": f.name,
                "type": type_label(hints[f.name]),
                "default": _plain(f.default),
                "bounds": bounds_label(hints[f.name]),
                "help": help_text(hints[f.name]),
            }
            for f in dataclasses.fields(cls)
        ]


# ---------------------------------------------------------------------- settings as data
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _settings_model(cls: type):
    """A pydantic model of ``cls``'s fields: their annotations (types, bounds, help) and defaults."""
    hints = _hints(cls)
    fields = {f.name: (hints[f.name], None) for f in dataclasses.fields(cls)}
    config = ConfigDict(allow_inf_nan=False, arbitrary_types_allowed=True)
    return create_model(f"{cls.__name__}Settings", __config__=config, **fields)


def check_settings(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (possibly command-line strings) checked and converted by the fields'
    annotations, or one ``VistrimError`` line naming the first bad setting."""
    hints = _hints(cls)
    prefix = getattr(cls, "name", "") or cls.__name__
    prepared = {key: _from_text(value, hints[key], f"{prefix}.{key}") for key, value in values.items()}
    try:
        model = _settings_model(cls)(**prepared)
    except ValidationError as error:
        raise VistrimError(_one_line(prefix, error, values, hints)) from None
    checked = {key: getattr(model, key) for key in values}
    for key, value in checked.items():
        if _plain_int(hints[key]) and isinstance(value, int) and not -INT64 <= value < INT64:
            raise VistrimError(f"{prefix}.{key}={value!r} is out of range (a 64-bit integer)")
    return checked


def _from_text(value: Any, annotation: Any, field: str) -> Any:
    """Command-line conventions pydantic does not know: ``none``, lists written as ``2,6,10`` or
    ``8:0.5,16:0.25``; and no bool where a number is expected (pydantic would take True as 1)."""
    members = _members(annotation)
    if isinstance(value, bool) and bool not in members and any(m in (int, float) for m in members):
        raise VistrimError(f"{field}={value!r} must be {type_phrase(annotation)}")
    if not isinstance(value, str):
        return value
    if type(None) in members and value.strip().lower() == "none":
        return None
    if any(get_origin(m) is tuple for m in members):
        return _parse_list(value)
    return value


def _parse_list(text: str) -> list:
    """'8:0.5,16:0.25' -> [['8','0.5'],['16','0.25']]; '2,6,10' -> ['2','6','10']; '' -> []."""
    text = text.strip().strip("[]()")
    if not text:
        return []
    parts = [p.strip() for p in text.split(",")]
    return [p.split(":") if ":" in p else p for p in parts]


RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _one_line(prefix: str, error: ValidationError, values: dict, hints: dict) -> str:
    key = error.errors()[0]["loc"][0]
    field, value, annotation = f"{prefix}.{key}", values[key], hints[key]
    mine = [e for e in error.errors() if e["loc"][0] == key]
    nested = [e for e in mine if any(isinstance(part, int) for part in e["loc"][1:])]
    if get_origin(_strip(annotation)[0]) is tuple and nested:  # a bad item inside a list
        item = nested[0]
        return f"{field}={value!r}: item {item['input']!r}: {item['msg'][0].lower()}{item['msg'][1:]}"
    if any(e["type"] in RANGE_ERRORS for e in mine):
        return f"{field}={value!r} is out of range: must be {type_phrase(annotation)}"
    if any(e["type"] == "finite_number" for e in mine):
        return f"{field}={value!r} must be finite"
    return f"{field}={value!r} must be {type_phrase(annotation)}"


def _strip(annotation: Any) -> tuple[Any, list]:
    """(the bare type, its pydantic FieldInfo metadata) of an ``Annotated`` annotation."""
    metadata = []
    while get_origin(annotation) is Annotated:
        args = get_args(annotation)
        annotation, metadata = args[0], metadata + [m for m in args[1:] if isinstance(m, FieldInfo)]
    return annotation, metadata


def _options(annotation: Any) -> list:
    bare, _ = _strip(annotation)
    if get_origin(bare) in (Union, types.UnionType):
        return list(get_args(bare))
    return [annotation]


def _members(annotation: Any) -> list:
    """The bare types of a (possibly Annotated, possibly Union) annotation."""
    return [_strip(option)[0] for option in _options(annotation)]


def _plain_int(annotation: Any) -> bool:
    members = [m for m in _members(annotation) if m is not type(None)]
    return members == [int]


def _bounds(annotation: Any) -> str:
    _, metadata = _strip(annotation)
    found = {}
    for info in metadata:
        for item in info.metadata:
            for key in ("ge", "gt", "le", "lt"):
                if getattr(item, key, None) is not None:
                    found[key] = getattr(item, key)
    if "ge" in found and "le" in found:
        return f"in [{found['ge']:g}, {found['le']:g}]"
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{symbols[key]} {value:g}" for key, value in found.items())


def type_phrase(annotation: Any) -> str:
    """How an error names what a setting must be: 'an integer >= 1', 'true or false', ..."""
    phrases = []
    for option in _options(annotation):
        bare, _ = _strip(option)
        bounds = _bounds(option)
        if bare is bool:
            phrases.append("true or false")
        elif bare is int:
            phrases.append(f"an integer {bounds}".strip())
        elif bare is float:
            phrases.append(f"a number {bounds}".strip())
        elif bare is str:
            phrases.append("a string")
        elif bare is type(None):
            phrases.append("none")
        elif get_origin(bare) is Literal:
            phrases.append("one of " + ", ".join(repr(a) if a == "" else str(a) for a in get_args(bare)))
        elif get_origin(bare) is tuple:
            phrases.append("a list (e.g. 2,6,10 or 8:0.5,16:0.25)")
        else:
            phrases.append(str(bare))
    return " or ".join(phrases)


def type_label(annotation: Any) -> str:
    """A short type for tables: int, float, bool, count|ratio, linear|cosine, list, ...|none."""
    bare = _strip(annotation)[0]
    if bare == Budget or bare == Union[Budget, None]:  # noqa: UP007
        return "count|ratio" + ("|none" if bare != Budget else "")
    labels = []
    for bare in _members(annotation):
        if get_origin(bare) is Literal:
            labels.append("|".join(str(a) or "''" for a in get_args(bare)))
        elif get_origin(bare) is tuple:
            labels.append("list")
        elif bare is type(None):
            labels.append("none")
        else:
            labels.append(getattr(bare, "__name__", str(bare)))
    return "|".join(labels)


def bounds_label(annotation: Any) -> str:
    bare = _strip(annotation)[0]
    if bare == Budget or bare == Union[Budget, None]:  # noqa: UP007
        return "count >= 0, ratio in [0, 1]"
    return "; ".join(filter(None, (_bounds(option) for option in _options(annotation))))


def help_text(annotation: Any) -> str:
    _, metadata = _strip(annotation)
    return next((info.description for info in reversed(metadata) if info.description), "")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------- checks and helpers
def check_range(value: float, field: str, low: float | None = None, high: float | None = None) -> None:
    """For bounds that depend on other settings or on the model (fixed bounds live on the fields)."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise VistrimError(f"{field}={value} is out of range {bounds}")


def check_layer(value: int, field: str, geo, low: int = 0) -> None:
    if not low <= value < geo.num_layers:
        raise VistrimError(
            f"{field}={value} is out of range for a model with {geo.num_layers} decoder layers"
        )


def scale_layer(layer: float, depth_ref: int | None, num_layers: int) -> int:
    """A layer index given for a ``depth_ref``-layer model, mapped to ``num_layers`` layers."""
    if not depth_ref:
        return int(layer)
    return min(num_layers, int(math.floor(layer * num_layers / depth_ref + 0.5)))


def layer_average(counts: list[int], counting: Counting = "processed") -> float:
    """The layer-averaged visual tokens of per-layer prefill counts, counted the ``counting`` way."""
    if counting not in COUNTINGS:
        raise VistrimError(f"counting={counting!r} is not one of {', '.join(COUNTINGS)}")
    if counting == "post_cut":
        counts = post_cut(counts)
    return sum(counts) / len(counts)


def post_cut(counts: list[int]) -> list[int]:
    """Per-layer counts as released code logs them: a layer counts the visual tokens left after its
    own cut, i.e. what the next layer processes (the last layer: what it processes)."""
    return list(counts[1:]) + list(counts[-1:])


def solve_increasing(fn, target: float, low: float, high: float, iterations: int = 40) -> float:
    """The x in [low, high] where the non-decreasing ``fn`` comes closest to ``target`` (bisection)."""
    for _ in range(iterations):
        middle = (low + high) / 2
        if fn(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda x: abs(fn(x) - target))


def solve_count(fn, target: float, high: int) -> int:
    """The integer in [0, high] where the non-decreasing ``fn`` comes closest to ``target``
    (the smaller one on a tie, so a budget is never exceeded by a tie)."""
    low, top = 0, high
    while low < top:  # the smallest x with fn(x) >= target
        middle = (low + top) // 2
        low, top = (middle + 1, top) if fn(middle) < target else (low, middle)
    candidates = [x for x in (low - 1, low) if 0 <= x <= high]
    return min(candidates, key=lambda x: (abs(fn(x) - target), x))


def resolve_budget(budget: int | float, n_visual: int) -> float:
    """A layer-averaged budget as a token count: a float is a ratio of ``n_visual``, an int a count
    capped at ``n_visual`` (however large)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise VistrimError(f"budget={budget!r} must be a ratio (float) or a count (int)")
    budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if isinstance(budget, float) and not (math.isfinite(budget) and 0.0 <= budget <= 1.0):
        raise VistrimError(f"budget={budget} is out of range: a ratio must be in [0, 1] (an int is a count)")
    if isinstance(budget, int) and budget < 0:
        raise VistrimError(f"budget={budget} is out of range: a count must be >= 0")
    return budget * n_visual if isinstance(budget, float) else float(min(budget, n_visual))


# ---------------------------------------------------------------------- registry
REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def build(name: str | Method, **overrides: Any) -> Method:
    """A method instance by registry name with type-checked overrides (or a ready instance)."""
    if isinstance(name, Method):
        if overrides:
            return dataclasses.replace(name, **_check_fields(type(name), overrides))
        return name
    if name not in REGISTRY:
        raise VistrimError(f"unknown method {name!r} (available: {', '.join(REGISTRY)})")
    cls = REGISTRY[name]
    return cls(**_check_fields(cls, overrides))


def _check_fields(cls: type[Method], overrides: dict) -> dict:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if key not in names:
            raise VistrimError(
                f"method {cls.name!r} has no setting {key!r} (settings: {', '.join(names) or 'none'})"
            )
    return overrides
