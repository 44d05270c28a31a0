"""Accuracy of one saved test-bed 2 on the training script's test scenes, seed by seed.

    python docs/results/testbed2-attempt13/accuracy_by_seed.py FOLDER 3,4,5,6,7,8 [SCENES]

``shapes.eval_items(SCENES, seed)`` draws from the test split (photos and random stream never
used in training); prints seed, questions, right answers and accuracy, one line per seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from vistrim.data import shapes
from vistrim.evaluate.harness import answer, item_batches, score
from vistrim.models.testbed import load_testbed


def main() -> None:
    torch.set_num_threads(2)
    model, processor = load_testbed(folder=Path(sys.argv[1]))
    scenes = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    for seed in (int(s) for s in sys.argv[2].split(",")):
        items = shapes.eval_items(scenes, seed)
        right = np.array(score(items, answer(model, processor, item_batches(items, 50)).texts), float)
        print(seed, len(right), int(right.sum()), f"{right.mean():.4f}", flush=True)


if __name__ == "__main__":
    main()
