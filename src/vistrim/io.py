"""Reading user inputs (images) with one-line errors."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import VistrimError

MIN_SIDE = 2


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from ``path``: any mode PIL reads (palette, grayscale, 16-bit, alpha, the first
    frame of an animation) is converted; missing, unreadable or degenerate files are errors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise VistrimError(f"image not found: {path}")
    if path.is_dir():
        raise VistrimError(f"image path is a folder: {path}")
    try:
        with Image.open(path) as image:
            image.seek(0)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                image = image.point(lambda v: v / 256).convert("L")
            rgb = image.convert("RGB")
            rgb.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise VistrimError(
            f"cannot read image {path}: {str(error).splitlines()[0] or 'corrupt file'}"
        ) from None
    if min(rgb.size) < MIN_SIDE:
        raise VistrimError(f"image {path} is too small ({rgb.size[0]}x{rgb.size[1]} pixels)")
    return rgb
