"""What a fine-tuning strategy that trains the head on cached features needs of a data module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import lightning as L
from torch.utils.data import Dataset

from finetune.finetuning.feature_cache import FeatureSource


@runtime_checkable
class FeatureData(FeatureSource, Protocol):
    """What the strategies that train the head on cached features use of a data module
    (`finetune.data.datamodule.ImageDataModule`'s data contract), besides what the cache reads."""

    @property
    def random_training(self) -> bool: ...

    @property
    def mixes_batches(self) -> bool: ...

    def use_stand_in(self, stand_in: Callable[[str], Dataset | None] | None) -> None: ...

    def train_eval_view(self) -> Dataset: ...


def feature_data(trainer: L.Trainer) -> FeatureData | None:
    """The trainer's data module if it can stand cached features in for its splits, else None."""
    datamodule = trainer.datamodule
    return datamodule if isinstance(datamodule, FeatureData) else None
