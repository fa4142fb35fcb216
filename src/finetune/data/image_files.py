"""Arbitrary files to predict on: any of them may turn out not to be a readable image.

A bad file must not stop a batch of thousands, so reading happens in the dataset (in the loader
workers) and a failure travels with the batch as a (path, reason) pair instead of an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from finetune.data.decode import decoder, load_rgb
from finetune.data.file_walk import iter_files, open_regular, printable
from finetune.data.transforms import BatchResize, Preprocessing, eval_pipeline
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


def read_image(source: str | bytes, loader: Callable[[str | bytes], Image.Image],
               transform: Callable[[Any], torch.Tensor], shape: tuple[int, int, int]) -> tuple[torch.Tensor | None, str]:
    """(`source` loaded and transformed, "") or (None, why it is not a usable image): one image
    read the way predict reads files, for the dataset below and for the server (bytes)."""
    try:
        image = transform(loader(source))
    except UnidentifiedImageError:
        return None, "not an image (PIL cannot identify the format)"
    except _UNREADABLE as e:
        return None, " ".join(str(e).split()) or type(e).__name__
    if tuple(image.shape) != shape:
        return None, f"transformed to shape {tuple(image.shape)}, expected {shape}"
    return image, ""


class ImageFiles(Dataset):
    """`files` read by `loader` and put through `transform` (which must give `shape`); `collate`
    makes (images, paths, skipped) batches where skipped lists (path, reason) for unreadable files."""

    def __init__(self, files: list[Path], transform: Callable[[Any], torch.Tensor],
                 shape: tuple[int, int, int], loader: Callable[[str], Image.Image] = load_rgb,
                 batch_transform: BatchResize | None = None) -> None:
        self.files, self.transform, self.shape, self.loader = files, transform, shape, loader
        # Applied to each batch of images after `collate`, on the model's device (tiny sources).
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str]:
        path = str(self.files[index])
        return path, *read_image(path, self.loader, self.transform, self.shape)

    def collate(self, items: list[tuple[str, torch.Tensor | None, str]]) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        good = [(path, image) for path, image, _ in items if image is not None]
        skipped = [(path, reason) for path, image, reason in items if image is None]
        images = torch.stack([image for _, image in good]) if good else torch.empty(0, *self.shape)
        return images, [path for path, _ in good], skipped


def largest_side(files: list[Path], samples: int = 16) -> int | None:
    """The longest image side among the first `samples` readable files (headers only): the one
    number the evaluation path is chosen from, as for a folder source."""
    sides = []
    for path in files:
        try:
            with open_regular(path) as f, Image.open(f) as image:  # a FIFO: skipped, never a blocked read
                sides.append(max(image.size))
        except (*_UNREADABLE, UnidentifiedImageError):
            continue
        if len(sides) >= samples:
            break
    return max(sides) if sides else None


def model_inputs(files: list[Path], p: Preprocessing) -> ImageFiles:
    """`files` decoded and transformed exactly as a model with preprocessing `p` is evaluated:
    the same decoder as training's, then the evaluation path eval takes for such images
    (`eval_pipeline`: for tiny ones, a native-size crop here and `batch_transform` per batch).
    What predict and export's input check feed the model."""
    pipeline = eval_pipeline(p, largest_side(files))
    return ImageFiles(files, pipeline.transform, (3, pipeline.side, pipeline.side), loader=decoder(p),
                      batch_transform=pipeline.batch)


class ImageFilesData(L.LightningDataModule):
    """predict's loader over `ImageFiles`, with their per-batch step applied on the device, as the
    training data modules apply theirs (`on_after_batch_transfer`)."""

    def __init__(self, dataset: ImageFiles, **loader_kwargs: Any) -> None:
        super().__init__()
        self.dataset, self.loader_kwargs = dataset, loader_kwargs

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, collate_fn=self.dataset.collate, **self.loader_kwargs)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, *rest = batch
        if self.dataset.batch_transform is not None and len(images):
            images = self.dataset.batch_transform(images)
        return (images, *rest)
