"""vistrim: training-free visual-token trimming for Hugging Face multimodal LLMs."""

from .api import apply, at_budget, build, methods, remove, trim
from .errors import VistrimError

__version__ = "0.1.0"

__all__ = ["VistrimError", "apply", "at_budget", "build", "methods", "remove", "trim", "__version__"]
