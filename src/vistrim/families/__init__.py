"""Model families: one adapter file each, chosen by the model's class (see ``base.Family``).

Importing this package registers every family; ``family_for(model)`` returns the adapter or
raises a one-line ``VistrimError`` naming why the model is not supported.
"""

# Importing a family module registers it (and ``refused`` the classes vistrim refuses).
from . import (  # noqa: F401
    aya_vision,
    glm4v,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    qwen2_vl,
    qwen3_vl,
    refused,
)
from .base import FAMILIES, REFUSED, Family, Geometry, Layout, VisionTower, family_class, family_for

__all__ = ["FAMILIES", "REFUSED", "Family", "Geometry", "Layout", "VisionTower", "family_class", "family_for"]
