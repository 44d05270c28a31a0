"""Public entry points: ``trim`` (context manager), ``apply``/``remove``, ``list_methods``, ``build``.

(The registry function is ``list_methods``, not ``methods``: ``vistrim.methods`` is the subpackage.)
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import VistrimError
from .methods import REGISTRY, Method, build  # noqa: F401  (re-exported)
from .methods.base import COUNTINGS, Counting, resolve_budget
from .runtime.session import Session

_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def list_methods() -> dict[str, type[Method]]:
    """Registered method names and their classes."""
    return dict(REGISTRY)


def at_budget(
    method: str | Method,
    budget: int | float,
    *,
    n_visual: int,
    num_layers: int,
    counting: Counting | None = None,
    **settings,
) -> Method:
    """``method`` (with ``settings`` fixed) configured so that its layer-averaged visual tokens in
    prefill come closest to ``budget``: a float is a ratio of ``n_visual``, an int a count (capped
    at ``n_visual``).

    ``counting``: ``processed`` (default, vistrim's count: what each layer processes) or
    ``post_cut`` (as MustDrop's and other released code logs it: a pruning layer counts the tokens
    left after its cut), so that a "64" means what it means in the table it is compared with;
    by default the method's own ``counting`` setting where it has one (MustDrop), else ``processed``."""
    for name, value, low in (("n_visual", n_visual, 0), ("num_layers", num_layers, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise VistrimError(f"at_budget: {name} must be an integer >= {low}, got {value!r}")
    base = build(method, **settings)
    if counting is None:
        counting = getattr(base, "counting", "processed")
    if counting not in COUNTINGS:
        raise VistrimError(f"counting={counting!r} is not one of {', '.join(COUNTINGS)}")
    return base.at_budget(resolve_budget(budget, n_visual), int(n_visual), int(num_layers), counting)


def apply(model: torch.nn.Module, method: str | Method = "none", **settings) -> Session:
    """Install trimming hooks on ``model`` (this instance only) and return the session.

    Prefer ``with trim(...)``; for notebooks, undo with ``remove(model)``.
    """
    if model in _ACTIVE:
        raise VistrimError("this model is already trimmed; call vistrim.remove(model) first")
    session = Session(model, build(method, **settings))
    session.install()
    _ACTIVE[model] = session
    return session


def remove(model: torch.nn.Module) -> None:
    """Remove every hook vistrim installed on ``model`` (no-op if none)."""
    session = _ACTIVE.pop(model, None)
    if session is not None:
        session.remove()


def _remove_session(model: torch.nn.Module, session: Session) -> None:
    """Remove ``session``'s hooks, and forget it as the model's active session only if it still is
    (inside the block a user may have removed it and applied another one)."""
    if _ACTIVE.get(model) is session:
        del _ACTIVE[model]
    session.remove()


@contextmanager
def trim(model: torch.nn.Module, method: str | Method = "none", **settings) -> Iterator[Session]:
    """Trim visual tokens of ``model`` inside the block; hooks are removed on exit, also on error.

    >>> with vistrim.trim(model, "fastv", keep=0.25) as session:
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> session.stats.layer_average_mean()
    """
    session = apply(model, method, **settings)
    try:
        yield session
    finally:
        _remove_session(model, session)
