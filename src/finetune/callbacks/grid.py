"""Captioned image grids for TensorBoard, and what the views share.

TensorBoard images carry no captions, so labels are drawn into a band under each tile; a wrong
prediction gets a red frame and red text so it stands out at a glance in a grid of sixteen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import ImageDraw, ImageFont
from torchvision.transforms.v2.functional import to_image, to_pil_image
from torchvision.utils import make_grid

from finetune.data.transforms import denormalise

CAPTION_LINES = 2
LINE_HEIGHT = 12
PADDING = 2
FRAME = 3
RIGHT, WRONG, NEUTRAL = (60, 200, 80), (255, 60, 60), (255, 255, 255)


def tensorboard(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the run's TensorBoard logger, or None (no TensorBoard, not rank zero)."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


@torch.no_grad()
def batch_logits(pl_module: L.LightningModule, outputs: Any, images: torch.Tensor) -> torch.Tensor:
    """The logits the step returned, or a fresh forward pass when the step returned none."""
    if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and len(outputs) == len(images):
        return outputs.detach()
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"].detach()
    return pl_module(images)


def displayable(images: torch.Tensor, pl_module: L.LightningModule) -> torch.Tensor:
    """Un-normalised images in [0, 1] on the CPU, using the model's own preprocessing record."""
    images = images.detach().float().cpu()
    preprocessing = getattr(pl_module, "preprocessing", None)
    if preprocessing is not None:
        return denormalise(images, preprocessing)
    low, high = images.amin(), images.amax()
    return (images - low) / (high - low).clamp_min(1e-8)


def grid_size(n: int, tile: int) -> tuple[int, int]:
    """(height, width) of the grid `captioned_grid` makes for `n` tiles."""
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    band = CAPTION_LINES * LINE_HEIGHT
    return nrow * (tile + band + PADDING) + PADDING, ncol * (tile + PADDING) + PADDING


def captioned_grid(
    images: torch.Tensor, captions: Sequence[str], wrong: Sequence[bool | None], tile: int = 112
) -> torch.Tensor:
    """A (3, H, W) uint8 grid of `images` (N, 3, h, w in [0, 1]), each resized to `tile` pixels
    with its caption (up to two lines) underneath; `wrong` True: red, False: green, None: neutral."""
    tiles = F.interpolate(images, size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
    tiles = tiles.clamp(0, 1)
    band = CAPTION_LINES * LINE_HEIGHT
    tiles = F.pad(tiles, (0, 0, 0, band), value=0.0)
    colours = [NEUTRAL if w is None else WRONG if w else RIGHT for w in wrong]
    for t, colour in zip(tiles, colours):
        if colour is not NEUTRAL:
            rgb = torch.tensor(colour, dtype=t.dtype).view(3, 1, 1) / 255
            t[:, :FRAME, :tile] = rgb
            t[:, tile - FRAME:tile, :tile] = rgb
            t[:, :tile, :FRAME] = rgb
            t[:, :tile, tile - FRAME:] = rgb
    ncol = math.ceil(math.sqrt(len(tiles)))
    tiles = (tiles * 255).round().to(torch.uint8)
    picture = to_pil_image(make_grid(tiles, nrow=ncol, padding=PADDING, pad_value=255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    max_chars = max(4, tile // 5)
    for i, (caption, colour) in enumerate(zip(captions, colours)):
        row, col = divmod(i, ncol)
        x = PADDING + col * (tile + PADDING) + 2
        y = PADDING + row * (tile + band + PADDING) + tile
        for line_no, line in enumerate(caption.splitlines()[:CAPTION_LINES]):
            draw.text((x, y + line_no * LINE_HEIGHT), line[:max_chars], fill=colour, font=font)
    return to_image(picture)
