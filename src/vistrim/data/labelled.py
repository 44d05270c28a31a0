"""Which labelled test questions a model is measured on (``vistrim eval`` and ``vistrim bench``).

Light on purpose (no torch import): the command line resolves its plan before loading anything.
"""

from __future__ import annotations

DATA = ("easy-vqa", "shapes")
SHAPES_SCENES = 300  # test scenes of test-bed 2's split (~2,250 questions) that subsets come from


def default_data(model_spec: str) -> str:
    """The labelled questions a model is measured on: test-bed 2's own split, easy-vqa otherwise."""
    return "shapes" if model_spec == "testbed2" else "easy-vqa"


def labelled_data_name(data: str) -> str:
    """How the settings of a run name the labelled questions of ``data``."""
    name = f"shapes test split ({SHAPES_SCENES} scenes, seed 0)" if data == "shapes" else "easy-vqa test"
    return f"{name}, fixed_subset(seed=0)"


def labelled_pool(data: str) -> list:
    """Every labelled test question of ``data`` (the pool fixed subsets are drawn from)."""
    if data == "shapes":
        from .shapes import eval_items

        return eval_items(SHAPES_SCENES, seed=0)
    from .easyvqa import load_split

    return load_split("test")


def labelled_test_items(data: str, n: int) -> tuple[list, str]:
    """A fixed seeded subset of ``n`` labelled test questions and a description for the settings."""
    from .easyvqa import fixed_subset

    return fixed_subset(labelled_pool(data), n, seed=0), labelled_data_name(data)
