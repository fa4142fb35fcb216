"""The DataModule every data set shares: transforms, the validation split and the loaders.

Subclasses only say where the images come from (`classes`, `prepare_data`, `make_split`).
"""

from __future__ import annotations

import os
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset

from finetune.data.transforms import Preprocessing, eval_transform, train_transform

SPLITS = ("train", "val", "test")


def default_num_workers() -> int:
    """Leave one core to the training process; never more than 8 workers."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class ImageDataModule(L.LightningDataModule):
    """Image classification data with transforms from the model's preprocessing.

    Sizes, mean and std left as None are taken from the pretrained weights (see `adopt`).
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        image_size: int | None = None,
        resize_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        crop_scale: Sequence[float] | None = None,
        hflip: bool | None = None,
        augment: bool | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.overrides = dict(
            crop_size=image_size, resize_size=resize_size, mean=mean, std=std,
            interpolation=interpolation, crop_scale=crop_scale, hflip=hflip, augment=augment,
        )
        self.val_fraction = val_fraction
        self.seed = seed
        self.preprocessing = Preprocessing().override(**self.overrides)
        self.datasets: dict[str, Dataset] = {}

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    def make_split(self, split: str, transform) -> Dataset | None:
        """The data set for `split` with `transform` applied; None when the source has no such split."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def adopt(self, model_preprocessing: Preprocessing) -> Preprocessing:
        """Use the model's preprocessing, with this config's explicit values on top."""
        self.preprocessing = model_preprocessing.override(**self.overrides)
        self.datasets.clear()
        return self.preprocessing

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        p = self.preprocessing
        train_tf, eval_tf = train_transform(p), eval_transform(p)
        train, val = self.make_split("train", train_tf), self.make_split("val", eval_tf)
        if val is None:
            train, val = self._split_off_val(train, self.make_split("train", eval_tf))
        self.datasets = {"train": train, "val": val, "test": self.make_split("test", eval_tf)}

    def _split_off_val(self, train: Dataset, train_eval: Dataset) -> tuple[Dataset, Dataset]:
        """A seeded fraction of train, seen through the eval transform, becomes val."""
        n = len(train)
        n_val = max(1, int(round(n * self.val_fraction)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return Subset(train, order[n_val:]), Subset(train_eval, order[:n_val])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        batch_size = self.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=None if split == "train" else self._eval_sampler(dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            # A last batch of one image breaks BatchNorm in training mode.
            drop_last=shuffle and len(dataset) > batch_size,
        )

    def _eval_sampler(self, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each val/test image on exactly one rank. Lightning's default sampler repeats
        images to even out the ranks, and the repeats would count twice in the accuracy."""
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2:
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
