"""Image files to uint8 pixels with PIL and numpy alone (no torch), so that decoding worker processes
(data/pixel_cache.py) start without importing torch; data/images.py builds its preprocessing on these."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cirlab.errors import CirlabError


def open_image(path) -> Image.Image:
    """Open an image, with a clear error for a missing or unreadable file."""
    p = Path(path)
    if not p.exists():
        raise CirlabError(f"image not found: {p}")
    try:
        img = Image.open(p)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise CirlabError(f"cannot read image {p}: {e}") from None
    return img


def to_uint8(img: Image.Image, size: int) -> np.ndarray:
    """RGB, the shorter side resized to `size` (bicubic), centre-cropped: uint8 (3, size, size)."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, S, S)


def decode_uint8(path, size: int) -> np.ndarray:
    """One image file as PixelStore keeps it at `size`: uint8 (3, size, size)."""
    return to_uint8(open_image(path), size)
