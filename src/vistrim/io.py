"""Reading user inputs (images, text files) with one-line errors.

Images and text files come from users and may be hostile or broken: an image is decoded only if
its header declares at most ``MAX_PIXELS`` pixels (a guard against decompression bombs) and only
from the formats in ``IMAGE_FORMATS`` (PIL's other plug-ins include ones that run external
programs); a text file must be a regular file of UTF-8 text of at most ``MAX_TEXT_BYTES``.
"""

from __future__ import annotations

import codecs
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import VistrimError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

MIN_SIDE = 2
MAX_PIXELS = 64 * 2**20  # 67,108,864 (8192 x 8192): far above any vision tower's input size
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
MAX_TEXT_BYTES = 16 * 2**20


def load_image(path: str | Path) -> PILImage:
    """An RGB image from ``path``: any mode PIL reads (palette, grayscale, 16-bit, alpha,
    the first frame of an animation) is converted; missing, unreadable, oversized or degenerate
    files are errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.exists():
        raise VistrimError(f"image not found: {path}")
    if path.is_dir():
        raise VistrimError(f"image path is a folder: {path}")
    try:
        with warnings.catch_warnings():
            # the size check below decides; PIL's own warning would be a second line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_readable_formats()) as image:
                image.seek(0)
                check_pixels(path, *image.size)
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                    image = image.point(lambda v: v / 256).convert("L")
                rgb = image.convert("RGB")
                rgb.load()
    except Image.DecompressionBombError:  # PIL refused the header before we saw the size
        raise VistrimError(f"image {path} declares more pixels than {_limit()}") from None
    except UnidentifiedImageError:
        formats = ", ".join(IMAGE_FORMATS)
        raise VistrimError(
            f"cannot read image {path}: not an image in a supported format ({formats})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise VistrimError(
            f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else 'corrupt file'}"
        ) from None
    if min(rgb.size) < MIN_SIDE:
        raise VistrimError(f"image {path} is too small ({rgb.size[0]}x{rgb.size[1]} pixels)")
    return rgb


def _readable_formats() -> list[str]:
    """IMAGE_FORMATS this Pillow build can open (WebP support is optional)."""
    from PIL import Image

    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def check_pixels(path: Path, width: int, height: int) -> None:
    """Called on the header's size, before any pixel is decoded."""
    if width * height > MAX_PIXELS:
        raise VistrimError(
            f"image {path} is {width}x{height}: {width * height:,} pixels, more than {_limit()}"
        )


def _limit() -> str:
    return f"vistrim's limit of {MAX_PIXELS:,} (io.MAX_PIXELS, a guard against decompression bombs)"


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a regular file (a leading byte-order mark is dropped); ``what`` names
    the file in errors ("prompts file", "config file")."""
    path = Path(path).expanduser()
    if not path.exists():
        raise VistrimError(f"{what} not found: {path}")
    if path.is_dir():
        raise VistrimError(f"{what} is a folder: {path}")
    if not path.is_file():
        raise VistrimError(f"{what} is not a regular file: {path}")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise VistrimError(f"{what} {path} is larger than {MAX_TEXT_BYTES // 2**20} MB")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise VistrimError(f"cannot read {what} {path}: {error.strerror or error}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise VistrimError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line})"
        ) from None
    if "\x00" in text:
        raise VistrimError(f"{what} {path} is a binary file, not text")
    return text
