"""Pure tensor functions: no model imports, shapes in docstrings, unit-tested on hand-made tensors."""
