"""The loaders a data module builds (`ImageDataModule.loader`): training's shuffles and resumes,
evaluation's reads in order and, under DDP, gives each image to exactly one rank."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from finetune.data.resumable_loader import resumable_train_loader


@dataclass(frozen=True)
class LoaderSettings:
    """What every loader of a split is built with (the data.* loader settings, resolved)."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    collate_fn: Callable[[list], Any]

    def kwargs(self) -> dict[str, Any]:
        """DataLoader's keyword arguments (worker settings only when there are workers)."""
        workers = self.num_workers
        return {"batch_size": self.batch_size, "num_workers": workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.persistent_workers and workers > 0,
                "prefetch_factor": self.prefetch_factor if workers > 0 else None, "collate_fn": self.collate_fn}


def train_loader(dataset: Dataset, settings: LoaderSettings, seed: int, trainer: L.Trainer | None) -> DataLoader:
    """Shuffled, each rank its share. Its position, shuffle and worker RNGs go into checkpoints: a
    resumed run sees the batches the killed one had not, in the same order and with the same
    augmentations (`finetune.data.resumable_loader`)."""
    kwargs = settings.kwargs()
    workers = kwargs.pop("num_workers")
    return resumable_train_loader(
        dataset, num_workers=workers, seed=seed,
        num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
        drop_last=len(dataset) > settings.batch_size,  # a last batch of one image breaks BatchNorm
        **kwargs)


def eval_loader(dataset: Dataset, settings: LoaderSettings, trainer: L.Trainer | None) -> DataLoader:
    """In order; under DDP (a `trainer` with several ranks) each image on exactly one rank.

    A generator of its own: creating the iterator draws the workers' base seed, and from the
    global RNG that draw would shift dropout and crops after a resume (no sanity check runs then,
    so persistent val workers start at a different point of the global stream).
    """
    return DataLoader(dataset, shuffle=False, sampler=eval_sampler(dataset, trainer), generator=torch.Generator(),
                      **settings.kwargs())


def eval_sampler(dataset: Dataset, trainer: L.Trainer | None) -> UnrepeatedDistributedSampler | None:
    """Under DDP, each val/test image on exactly one rank. Lightning's default sampler repeats
    images to even out the ranks, and the repeats would count twice in the accuracy."""
    if trainer is None or trainer.world_size < 2:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                        shuffle=False)
