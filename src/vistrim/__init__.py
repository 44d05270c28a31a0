"""vistrim: training-free visual-token trimming for Hugging Face multimodal LLMs."""

from . import methods  # the subpackage (its registry function is list_methods)
from .api import apply, at_budget, build, list_methods, remove, trim
from .errors import VistrimError

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
