"""`data=folder`: any ImageFolder tree with train/ and test/ (and val/ if present).

The tree is checked up front so that a typo in a path or a stray empty folder is reported in one
line before any model is built.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.data.datamodule import ImageDataModule
from finetune.errors import FinetuneError

LAYOUT = "expected DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (val/ optional)"


def _has_image(folder: Path) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def scan_classes(split_dir: Path) -> list[str]:
    """Class names of one split folder; every class folder must hold at least one image."""
    if not split_dir.is_dir():
        raise FinetuneError(f"missing folder {split_dir}; {LAYOUT}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FinetuneError(f"{split_dir} has no class subfolders; {LAYOUT}")
    for name in classes:
        if not _has_image(split_dir / name):
            raise FinetuneError(
                f"class folder {split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
    return classes


def check_tree(root: Path) -> list[str]:
    """Validate an ImageFolder tree and return its class names."""
    if not root.is_dir():
        raise FinetuneError(f"data.root={root} is not a folder; {LAYOUT}")
    classes = scan_classes(root / "train")
    for split in ("val", "test"):
        if split == "val" and not (root / "val").exists():
            continue
        other = scan_classes(root / split)
        if other != classes:
            only_train = sorted(set(classes) - set(other)) or "-"
            only_other = sorted(set(other) - set(classes)) or "-"
            raise FinetuneError(
                f"class folders differ between {root / 'train'} and {root / split}: "
                f"only in train: {only_train}; only in {split}: {only_other}; "
                "make both hold the same class folders"
            )
    return classes


class FolderDataModule(ImageDataModule):
    """Images from `root`/{train,val,test}/<class>/; val is split off train when absent."""

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()

    @cached_property
    def classes(self) -> list[str]:
        return check_tree(self.root)

    def make_split(self, split: str, transform) -> Dataset | None:
        folder = self.root / split
        if split == "val" and not folder.exists():
            return None
        return ImageFolder(str(folder), transform=transform)
