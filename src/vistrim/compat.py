"""Everything that differs between the transformers releases vistrim supports, in one place.

vistrim hooks into transformers' internals (forward keyword arguments, cache layers, mask
builders), which change between minor releases. The releases CI tests are ``TESTED``; the declared
dependency range in ``pyproject.toml`` is exactly that range (a test checks it). Names that moved
between them are looked up here once, from the signatures of the installed release, never spread
through the runtime:

- 5.24 renamed the ``past_key_values`` argument to ``cache`` in every multimodal core, language
  model, decoder layer and mask builder (the old name stays accepted with a deprecation warning
  until 5.40, but is *ignored* when both are given), and output objects carry ``.cache``.
- 5.24 gave ``Cache.update`` a ``kwargs=`` argument (``DynamicLayer.update`` takes ``**kwargs``, so
  subclasses that do not override ``update`` need nothing).
- 5.25 turned hub kernels on by default in ``from_pretrained`` (``use_kernels=None`` means True
  unless ``USE_HUB_KERNELS=0``; it then requires the ``kernels`` package and "kernelizes" RMSNorm,
  rotary and activation layers, fetching kernel code from the hub for the device). vistrim's loaders
  pass ``LOAD_OPTIONS`` (``use_kernels=False``, the default of 5.23 and 5.24), so a model loads the
  same on every tested release and never runs code fetched from the hub.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable

from packaging.version import Version

from .errors import VistrimError

# Supported minor releases, consecutive, oldest first; CI runs the suite on the first and the last.
TESTED: tuple[str, ...] = ("5.23", "5.24", "5.25")
CACHE_NAMES = ("cache", "past_key_values")  # the current name first, then the deprecated one
# Keyword arguments every vistrim ``from_pretrained`` of a model passes (accepted by all of TESTED).
LOAD_OPTIONS: dict[str, object] = {"use_kernels": False}


class VistrimWarning(UserWarning):
    """A one-line warning of vistrim's (e.g. an untested transformers release)."""


def installed() -> Version:
    """The transformers release installed (from its package metadata)."""
    return Version(importlib.metadata.version("transformers"))


def tested_range() -> str:
    """The pip requirement that admits exactly the tested minor releases, e.g. ``>=5.23,<5.25``."""
    low, high = Version(TESTED[0]), Version(TESTED[-1])
    return f">={low.major}.{low.minor},<{high.major}.{high.minor + 1}"


def is_tested(version: Version | None = None) -> bool:
    version = installed() if version is None else version
    return f"{version.major}.{version.minor}" in TESTED


def version_message(version: Version | None = None) -> str | None:
    """None for a tested release, else one line naming the installed version and the tested range."""
    version = installed() if version is None else version
    if is_tested(version):
        return None
    return (
        f"transformers {version} is not tested with vistrim {_own_version()} "
        f"(tested: {', '.join(TESTED)}; install 'transformers{tested_range()}')"
    )


def check_transformers(version: Version | None = None) -> None:
    """Refuse a release older than the oldest supported one (its internals differ in ways the
    runtime cannot work with); warn once, with one line, about a newer untested one."""
    version = installed() if version is None else version
    message = version_message(version)
    if message is None:
        return
    if version.release[:2] < Version(TESTED[0]).release[:2] or version.major != Version(TESTED[0]).major:
        raise VistrimError(message)
    _warn_once(message)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, VistrimWarning, stacklevel=3)


def _own_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------- cache argument and field
def cache_keyword(function: Callable) -> str:
    """The keyword under which ``function`` (a model's ``forward`` or a mask builder) takes the KV
    cache in the installed release."""
    parameters = inspect.signature(function).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise VistrimError(
        f"{getattr(function, '__qualname__', function)} takes no KV-cache argument in transformers "
        f"{installed()} (tested: {', '.join(TESTED)})"
    )


@dataclasses.dataclass(frozen=True)
class CacheArgument:
    """How one ``forward`` takes its cache: ``name`` now, and the deprecated ``aliases`` callers
    (generate, user code) may still use."""

    name: str

    @classmethod
    def of(cls, function: Callable) -> CacheArgument:
        return cls(cache_keyword(function))

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(n for n in CACHE_NAMES if n != self.name)

    def take(self, kwargs: dict):
        """The cache passed in ``kwargs`` under any name; moved to the current name, so that a
        cache vistrim sets is never shadowed by one given under the other name."""
        for alias in self.aliases:
            if alias in kwargs and kwargs.get(self.name) is None:
                kwargs[self.name] = kwargs.pop(alias)
        return kwargs.get(self.name)

    def put(self, kwargs: dict, cache) -> None:
        for alias in self.aliases:
            kwargs.pop(alias, None)
        kwargs[self.name] = cache


def output_cache(output):
    """The KV cache a model output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    for name in CACHE_NAMES:
        if name in output:
            return output[name]
    return None


def clear_output_cache(output) -> None:
    """Drop the cache from a model output, as an unpatched model returns none with use_cache=False."""
    for name in CACHE_NAMES:
        if name in output:  # ModelOutput refuses __delitem__ and keeps a key set to None
            collections.OrderedDict.__delitem__(output, name)
        if name in getattr(output, "__dataclass_fields__", {}):
            object.__setattr__(output, name, None)


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for calling ``model`` (or its core) with a cache in the installed release."""
    return {cache_keyword(model.forward): cache}


@functools.cache
def _mask_cache_keyword(builder: Callable) -> str:
    return cache_keyword(builder)


def build_mask(builder: Callable, *, cache, **kwargs):
    """Call a ``masking_utils`` builder (``create_causal_mask`` ...) with the cache under its name."""
    return builder(**kwargs, **{_mask_cache_keyword(builder): cache})
