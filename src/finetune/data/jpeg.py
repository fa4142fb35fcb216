"""How an image is shrunk to the size training reads and stored as JPEG: one way, for the resized
copy of a folder (`finetune.data.resized_cache`) and the converted chunks of `finetune.cli.optimize`,
so both hold the same pixels for the same image.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import BinaryIO

from PIL import Image

JPEG_QUALITY = 95


def shrunk(image: Image.Image, short_side: int) -> Image.Image:
    """`image` with its short side reduced to `short_side` (bilinear, Pillow's full filter: no
    `reducing_gap` shortcut); an image no larger is returned as it is."""
    w, h = image.size
    if min(w, h) <= short_side:
        return image
    scale = short_side / min(w, h)
    size = (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


def save_jpeg(image: Image.Image, out: str | Path | BinaryIO) -> None:
    """`image` (RGB) as JPEG at `JPEG_QUALITY`, with full-resolution colour (4:4:4): Pillow's
    default 4:2:0 chroma halving costs small, colourful images ~13 levels of 255 on average (~3
    without it), for ~50% more bytes."""
    image.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def jpeg_bytes(image: Image.Image, short_side: int) -> bytes:
    """`image` as RGB JPEG bytes, shrunk to `short_side` (`shrunk`), stored as `save_jpeg` does."""
    out = io.BytesIO()
    save_jpeg(shrunk(image.convert("RGB"), short_side), out)
    return out.getvalue()
