"""Paired comparison of two saved test-bed 2 folders on the training script's test scenes.

    python docs/results/testbed2-attempt12/paired_scenes.py FOLDER_A FOLDER_B 3,4 [SCENES]

For each seed, ``shapes.eval_items(SCENES, seed)`` (the test split: photos and random stream
never used in training) is answered by both models; prints both accuracies, the paired
difference B - A in points with a 95% percentile bootstrap interval (4,000 resamples of
questions, seed 0), and accuracy per question type.
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
    folders = Path(sys.argv[1]), Path(sys.argv[2])
    seeds = [int(s) for s in sys.argv[3].split(",")]
    scenes = int(sys.argv[4]) if len(sys.argv) > 4 else 60
    items = [it for seed in seeds for it in shapes.eval_items(scenes, seed)]
    flags = []
    for folder in folders:
        model, processor = load_testbed(folder=folder)
        flags.append(np.array(score(items, answer(model, processor, item_batches(items, 50)).texts), float))
    a, b = flags
    diff = b - a
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (4000, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5]) * 100
    print(f"n={len(diff)} A={a.mean():.4f} B={b.mean():.4f}", end=" ")
    print(f"B-A={diff.mean() * 100:+.2f} points [{low:+.2f}, {high:+.2f}]")
    types = np.array([it.qtype for it in items])
    for qtype in sorted(set(types)):
        at = types == qtype
        print(f"{qtype} n={int(at.sum())} A={a[at].mean():.3f} B={b[at].mean():.3f}")


if __name__ == "__main__":
    main()
