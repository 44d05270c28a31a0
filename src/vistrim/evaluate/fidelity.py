"""Fidelity to the unpruned model, for any model and any prompt (no labels needed).

Two numbers per configuration: the share of greedy answers identical to the unpruned model's, and
the mean KL divergence KL(unpruned || method) of the first generated token's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import VistrimError
from ..io import read_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def first_token_kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B,) KL(p_ref || p) in nats from two (B, V) logit tensors (float64 for exact zeros)."""
    ref = torch.log_softmax(reference.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - other)).sum(-1).clamp(min=0.0)


def identical_share(reference: Sequence[str], answers: Sequence[str]) -> float:
    same = [a == b for a, b in zip(reference, answers, strict=True)]
    return sum(same) / max(1, len(same))


def fidelity_summary(
    ref_texts: Sequence[str],
    ref_logits: Sequence[torch.Tensor],
    texts: Sequence[str],
    logits: Sequence[torch.Tensor],
) -> dict:
    """Identical share, mean first-token KL and the per-item KL values."""
    kl = first_token_kl(torch.stack(list(ref_logits)), torch.stack(list(logits))) if texts else torch.zeros(0)
    return {
        "identical": identical_share(ref_texts, texts),
        "kl_first_token": float(kl.mean()) if kl.numel() else 0.0,
        "kl_per_item": kl.tolist(),
        "n": len(texts),
    }


def collect_images(paths: Sequence[str]) -> list[Path]:
    """Image files from files and folders (a folder's images in name order); one-line errors."""
    found: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if not path.exists():
            raise VistrimError(f"image or folder not found: {path}")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise VistrimError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            found += files
        else:
            found.append(path)
    return found


def read_prompts(file: str | None, text: str | None) -> list[str]:
    """Prompts from a file (one per line, blank lines skipped) and/or one ``--prompt``."""
    prompts = [text] if text and text.strip() else []
    if file is not None:
        prompts += [line.strip() for line in read_text(file, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise VistrimError("no prompt: give --prompt TEXT or --prompts FILE with one prompt per line")
    return prompts


def pair_up(images: Sequence, prompts: Sequence[str], limit: int | None = None) -> list[tuple]:
    """Every image with every prompt (image-major), at most ``limit`` pairs."""
    pairs = [(image, prompt) for image in images for prompt in prompts]
    return pairs[:limit] if limit else pairs


def pair_batches(pairs: Sequence[tuple], batch_size: int) -> list[tuple[list, list[str]]]:
    chunks = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    return [([image for image, _ in chunk], [prompt for _, prompt in chunk]) for chunk in chunks]
