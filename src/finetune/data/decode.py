"""One way to turn an image file into RGB pixels, for train, eval, predict and export's parity check.

A JPEG decoded at reduced scale (Pillow's draft mode: libjpeg skips the fine DCT coefficients) gives
slightly different pixels from a full decode. A deployed model must see the pixels it was evaluated
on, so every path that reads image files takes its loader from `decoder(p)`, and the choice
(`Preprocessing.draft_decode`, `data.draft_decode`) is stored in the checkpoint with the rest of
the preprocessing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from finetune.data.file_walk import open_regular

if TYPE_CHECKING:
    from finetune.data.transforms import Preprocessing


def load_rgb(path: str | bytes, min_side: int | None = None) -> Image.Image:
    """Open an image (a file path, or the file's bytes as a server receives them) as 8-bit RGB,
    upright; a JPEG at least twice `min_side` is decoded at 1/2, 1/4 or 1/8 scale.

    Draft mode makes a 1600x1200 photo read for a 224-pixel crop decode about 2x faster; the short
    side never drops below `min_side`. `min_side=None` is a full decode. The EXIF orientation tag
    is applied (a phone photo is seen the way every viewer shows it), and 16-bit images are scaled
    to 8 bits rather than clipped (Pillow's own conversion turns most of them white).
    """
    # Bytes (a served upload) or a file: a FIFO or device is an OSError, never a blocked read.
    with io.BytesIO(path) if isinstance(path, bytes) else open_regular(path) as f:
        image = Image.open(f)
        if min_side and image.format == "JPEG":
            w, h = image.size
            scale = min_side / min(w, h)
            if scale <= 0.5:
                image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            image = _to_8_bits(image)
        return image.convert("RGB")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer greyscale image as 8-bit "L": values above 255 mean a 16-bit range."""
    values = np.asarray(image, dtype=np.float32)
    if values.size and values.max() > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), "L")


def draft_side(p: Preprocessing) -> int | None:
    """The short side a draft decode must keep for `p` (the larger of resize and crop), or None
    when `p` asks for a full decode."""
    return max(p.resize_size, p.crop_size) if p.draft_decode else None


def decoder(p: Preprocessing) -> Callable[[str], Image.Image]:
    """The file loader for images fed through `p`'s transforms (picklable, for loader workers)."""
    return partial(load_rgb, min_side=draft_side(p))
