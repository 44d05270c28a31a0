"""vistrim: training-free visual-token trimming for Hugging Face multimodal LLMs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import VistrimError

if TYPE_CHECKING:
    from . import methods  # the subpackage (its registry function is list_methods)
    from .api import apply, at_budget, build, list_methods, remove, trim

__version__ = "0.1.0"

__all__ = [
    "VistrimError",
    "apply",
    "at_budget",
    "build",
    "list_methods",
    "methods",
    "remove",
    "trim",
    "__version__",
]
_API = ("apply", "at_budget", "build", "list_methods", "remove", "trim")


def __getattr__(name: str):
    # The API needs torch and transformers (seconds to import): it loads on first use, so that
    # `import vistrim.cli.main` (the start-up of every `vistrim` command) stays free of them.
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name == "methods":
        return importlib.import_module(".methods", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
