"""Model families: one adapter file each, chosen by the model's class (see ``base.Family``).

Importing this package registers every family; ``family_for(model)`` returns the adapter or
raises a one-line ``VistrimError`` naming why the model is not supported.
"""

from . import llava, llava_next, llava_onevision, qwen2_vl  # noqa: F401  (registration side effect)
from .base import FAMILIES, REFUSED, Family, Geometry, Layout, VisionTower, family_class, family_for

__all__ = ["FAMILIES", "REFUSED", "Family", "Geometry", "Layout", "VisionTower", "family_class", "family_for"]
