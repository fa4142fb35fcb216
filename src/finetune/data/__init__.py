"""Data: one DataModule base, a subclass per source, transforms and safe downloads."""

from finetune.data.cifar10 import CIFAR10DataModule
from finetune.data.datamodule import ImageDataModule
from finetune.data.folder import FolderDataModule
from finetune.data.hotdog import HotdogDataModule
from finetune.data.shapes import ShapesDataModule
from finetune.data.transforms import Preprocessing

__all__ = [
    "CIFAR10DataModule", "FolderDataModule", "HotdogDataModule", "ImageDataModule",
    "Preprocessing", "ShapesDataModule",
]
