"""Arbitrary files to predict on: any of them may turn out not to be a readable image.

A bad file must not stop a batch of thousands, so reading happens in the dataset (in the loader
workers) and a failure travels with the batch as a (path, reason) pair instead of an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from finetune.data.decode import decoder, load_rgb
from finetune.data.file_walk import iter_files, printable
from finetune.data.transforms import Preprocessing, eval_transform
from finetune.errors import FinetuneError

# What PIL and the transform raise for a file that is not a usable image.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, RuntimeError)


def find_files(path: str | Path) -> list[Path]:
    """`path` itself if it is not a folder, else every non-hidden entry below it, sorted, each
    real file once (no link loop followed); a named pipe or device is listed, and then reported
    as unreadable by `ImageFiles`, never opened in a way that blocks."""
    root = Path(str(path)).expanduser()
    if root.exists() and not root.is_dir():
        return [root]
    if not root.is_dir():
        raise FinetuneError(f"input={printable(str(root))} does not exist; pass input=FILE_OR_DIR with the "
                            "images to predict")
    files = sorted(Path(p) for p, _ in iter_files(root, keep=lambda name: not name.startswith(".")))
    if not files:
        raise FinetuneError(f"input={printable(str(root))} holds no files; pass input=FILE_OR_DIR with the images to predict")
    return files


class ImageFiles(Dataset):
    """`files` read by `loader` and put through `transform` (which must give `shape`); `collate`
    makes (images, paths, skipped) batches where skipped lists (path, reason) for unreadable files."""

    def __init__(self, files: list[Path], transform: Callable[[Any], torch.Tensor],
                 shape: tuple[int, int, int], loader: Callable[[str], Image.Image] = load_rgb) -> None:
        self.files, self.transform, self.shape, self.loader = files, transform, shape, loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        path = str(self.files[index])
        try:
            image = self.transform(self.loader(path))
        except UnidentifiedImageError:
            return path, None, "not an image (PIL cannot identify the format)"
        except _UNREADABLE as e:
            return path, None, " ".join(str(e).split()) or type(e).__name__
        if tuple(image.shape) != self.shape:
            return path, None, f"transformed to shape {tuple(image.shape)}, expected {self.shape}"
        return path, image, ""

    def collate(self, items: list[tuple[str, torch.Tensor | None, str]]) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        good = [(path, image) for path, image, _ in items if image is not None]
        skipped = [(path, reason) for path, image, reason in items if image is None]
        images = torch.stack([image for _, image in good]) if good else torch.empty(0, *self.shape)
        return images, [path for path, _ in good], skipped


def model_inputs(files: list[Path], p: Preprocessing) -> ImageFiles:
    """`files` decoded and transformed exactly as a model with preprocessing `p` was evaluated
    (the same decoder as training's, then the eval transform): what predict and export feed it."""
    return ImageFiles(files, eval_transform(p), (3, p.crop_size, p.crop_size), loader=decoder(p))
