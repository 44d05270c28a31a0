"""Registered methods. Importing this package registers every built-in method."""

from . import fastv, mustdrop, none, pdrop, random, st3  # noqa: F401  (registration side effect)
from .base import REGISTRY, Budget, Method, build, register

__all__ = ["REGISTRY", "Budget", "Method", "build", "register"]
