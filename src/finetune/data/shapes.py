"""A generated data set whose class is visible: the offline default for quick starts and tests.

Each image is a filled shape of random colour, size, position and rotation on a noisy background,
so colour and position say nothing about the class and a network has to learn the outline.
Images are drawn on demand from (seed, split, index): nothing is stored, every run sees the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from finetune.data.datamodule import ImageDataModule

CLASSES = ["circle", "square", "triangle", "cross"]
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in corners]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
               (-1, w), (-1, -w), (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class `label`, drawn from `rng`."""
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 25, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    colour = tuple(int(v) for v in (background + rng.integers(90, 166, size=3)) % 256)
    kind = CLASSES[label]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=colour)
    return image


class ShapesDataset(Dataset):
    def __init__(self, n: int, split: str, seed: int, size: int, transform=None) -> None:
        self.n, self.split_id, self.seed, self.size = n, _SPLIT_IDS[split], seed, size
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> tuple[int, ...]:
        return (self.n, self.split_id, self.seed, self.size)

    def __getitem__(self, index: int):
        label = index % len(CLASSES)
        image = draw_shape(label, np.random.default_rng([self.seed, self.split_id, index]), self.size)
        return (self.transform(image) if self.transform else image), label


class ShapesDataModule(ImageDataModule):
    """`data=shapes`: no download, four balanced classes, deterministic splits."""

    def __init__(
        self,
        train_size: int = 2000,
        val_size: int = 400,
        test_size: int = 400,
        native_size: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.native_size = native_size

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    def make_split(self, split: str, transform) -> Dataset | None:
        return ShapesDataset(self.sizes[split], split, self.seed, self.native_size, transform)


def write_image_folder(
    root: str | Path,
    per_class: dict[str, int],
    size: int = 64,
    seed: int = 0,
    suffix: str = ".png",
    classes: Sequence[str] = tuple(CLASSES),
) -> Path:
    """Write shapes as an ImageFolder tree (root/<split>/<class>/NNNN<suffix>) for tests and demos."""
    root = Path(root)
    for split, n in per_class.items():
        for name in classes:
            label = CLASSES.index(name)
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, _SPLIT_IDS.get(split, 3), label, i])
                draw_shape(label, rng, size).save(folder / f"{i:04d}{suffix}")
    return root
