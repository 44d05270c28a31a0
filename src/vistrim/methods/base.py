"""The method API: one dataclass per method, fields = hyper-parameters, a registry of names.

A method *scores and decides*; the runtime removes. It overrides the hooks it needs:

- ``prefill_layers(geo)`` / ``on_prefill_layer(ctx, layer)``: after those decoder layers have run
  in prefill, e.g. ``ctx.keep_top(scores, counts)`` to cut visual tokens for all deeper layers;
- ``on_prefill_end(ctx)``: after the whole prefill, e.g. evict entries from any layer's cache;
- ``decode_layers(geo)`` / ``on_decode_layer(ctx, layer)``: after those layers ran in a
  decoding step, e.g. ``ctx.evict_top(layer, scores, counts)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Collection
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from ..errors import VistrimError

Budget = Union[int, float]  # noqa: UP007  (a float is a ratio of the visual tokens, an int a count)


@dataclasses.dataclass
class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f"{self.name}.{f.name}"))
        self.validate()

    # ------------------------------------------------------------------ to override
    def validate(self) -> None:
        """Check field values; raise ``VistrimError`` with a one-line message."""

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

    # ------------------------------------------------------------------ budgets
    def predict_prefill(self, n_visual: int, num_layers: int) -> list[int]:
        """Visual tokens each decoder layer processes in prefill for a prompt with ``n_visual``
        (exact for methods whose counts do not depend on the data)."""
        raise VistrimError(f"method {self.name!r} cannot predict its token counts")

    def at_budget(self, target: float, n_visual: int, num_layers: int) -> Method:
        """A copy whose layer-averaged prefill visual tokens come closest to ``target`` tokens."""
        raise VistrimError(f"method {self.name!r} has no budget mode")

    # ------------------------------------------------------------------ shared
    def settings(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{self.name}({args})"


# ---------------------------------------------------------------------- validation helpers
def check_budget(value: Budget, field: str) -> None:
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise VistrimError(f"{field}={value} is out of range: a ratio must be in [0, 1] (an int is a count)")
    if isinstance(value, int) and value < 0:
        raise VistrimError(f"{field}={value} is out of range: a count must be >= 0")


def check_range(value: float, field: str, low: float | None = None, high: float | None = None) -> None:
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


def one_cut_counts(layer: int, keep: Budget, n_visual: int, num_layers: int) -> list[int]:
    """Counts of a single cut before ``layer`` keeping ``keep`` (ratio or count)."""
    kept = math.ceil(n_visual * keep - 1e-9) if isinstance(keep, float) else min(keep, n_visual)
    return [n_visual] * layer + [kept] * (num_layers - layer)


def one_cut_at_budget(layer: int, target: float, n_visual: int, num_layers: int) -> tuple[int, int]:
    """(layer, kept count) of a single cut before ``layer`` that best meets a layer average. The cut
    moves earlier only when even keeping nothing after it would exceed the budget."""
    while layer > 1 and layer * n_visual > target * num_layers:
        layer -= 1
    count = round((target * num_layers - layer * n_visual) / (num_layers - layer))
    return layer, min(max(count, 0), n_visual)


def layer_average(counts: list[int]) -> float:
    return sum(counts) / len(counts)


def solve_increasing(fn, target: float, low: float, high: float, iterations: int = 40) -> float:
    """The x in [low, high] where the non-decreasing ``fn`` comes closest to ``target`` (bisection)."""
    for _ in range(iterations):
        middle = (low + high) / 2
        if fn(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda x: abs(fn(x) - target))


def resolve_budget(budget: int | float, n_visual: int) -> float:
    """A layer-averaged budget as a token count: a float is a ratio of ``n_visual``, an int a count
    capped at ``n_visual`` (however large)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise VistrimError(f"budget={budget!r} must be a ratio (float) or a count (int)")
    budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    check_budget(budget, "budget")
    return budget * n_visual if isinstance(budget, float) else float(min(budget, n_visual))


# ---------------------------------------------------------------------- typed coercion
def coerce(value: Any, annotation: Any, field: str) -> Any:
    """Convert ``value`` (possibly a command-line string) to ``annotation``, or raise one line."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise VistrimError(f"{field}={value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, field)
    if origin is tuple:
        return _coerce_tuple(value, args, field)
    return _coerce_scalar(value, annotation, field)


def _coerce_union(value: Any, args: tuple, field: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in args:
            return None
        raise VistrimError(f"{field} cannot be none")
    options = [a for a in args if a is not type(None)]
    if isinstance(value, str):
        # Budget strings: "64" is a count, "0.5" a ratio.
        for option in sorted(options, key=lambda a: 0 if a is int else 1):
            try:
                return _coerce_option(value, option, field)
            except VistrimError:
                continue
    for option in options:
        if _is_instance(value, option):
            return _coerce_option(value, option, field)
    raise VistrimError(f"{field}={value!r} must be {' or '.join(_name(a) for a in options)}")


def _coerce_option(value: Any, option: Any, field: str) -> Any:
    if option is int:  # a count in a budget: any size, capped at the tokens available when used
        return _coerce_scalar(value, int, field, bounded=False)
    return coerce(value, option, field)


def _coerce_tuple(value: Any, args: tuple, field: str) -> tuple:
    if isinstance(value, str):
        value = _parse_tuple(value, field)
    if not isinstance(value, (tuple, list)):
        raise VistrimError(f"{field}={value!r} must be a list")
    item = args[0] if args else Any
    if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
        return tuple(coerce(v, item, field) for v in value)
    if len(value) != len(args):
        raise VistrimError(f"{field}={value!r} must have {len(args)} items")
    return tuple(coerce(v, a, field) for v, a in zip(value, args))


def _parse_tuple(text: str, field: str) -> list:
    """'8:0.5,16:0.25' -> [['8','0.5'],['16','0.25']]; '2,6,10' -> ['2','6','10']; '' -> []."""
    text = text.strip().strip("[]()")
    if not text:
        return []
    parts = [p.strip() for p in text.split(",")]
    return [p.split(":") if ":" in p else p for p in parts]


def _coerce_scalar(value: Any, annotation: Any, field: str, bounded: bool = True) -> Any:
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise VistrimError(f"{field}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise VistrimError(f"{field}={value!r} must be an integer")
        try:
            number = int(value)
        except ValueError:
            raise VistrimError(f"{field}={value!r} must be an integer") from None
        if bounded and not -(2**63) <= number < 2**63:  # torch takes seeds, layers, ... as int64
            raise VistrimError(f"{field}={value!r} is out of range (a 64-bit integer)")
        return number
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise VistrimError(f"{field}={value!r} must be a number")
        try:
            number = float(value)
        except ValueError:
            raise VistrimError(f"{field}={value!r} must be a number") from None
        if not math.isfinite(number):
            raise VistrimError(f"{field}={value!r} must be finite")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise VistrimError(f"{field}={value!r} must be a string")
        return value
    raise VistrimError(f"internal: unsupported setting type {annotation} for {field}")


def _is_instance(value: Any, annotation: Any) -> bool:
    if annotation is float:
        return isinstance(value, float)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = get_origin(annotation)
    if origin is tuple:
        return isinstance(value, (tuple, list))
    if origin is Literal:
        return value in get_args(annotation)
    return isinstance(value, annotation)


def _name(annotation: Any) -> str:
    if get_origin(annotation) is tuple:
        return "a list"
    if get_origin(annotation) is Literal:
        return "one of " + "/".join(map(str, get_args(annotation)))
    return {int: "an integer count", float: "a ratio", str: "a string", bool: "true/false"}.get(
        annotation, str(annotation)
    )


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


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
