"""The DataModule every data set shares, and its data contract.

Subclasses only say where the images come from (`classes`, `prepare_data`, `make_split`), and a
source that streams says how training iterates (`training_loader`). The contract:

- `loader(split)` is the only way a loader the Trainer reads is built, always over `dataset(split)`;
  `train/val/test/predict_dataloader` call it.
- `dataset(split)` is the split's images (`images(split)`), or the stand-in a callback offers
  through `use_stand_in` (LP-FT's and the frozen strategy's cached features), the one way a split
  is replaced. A stand-in's batches reach the model as it holds them: no per-batch resize, no
  MixUp/CutMix.
- Code that reads a split itself (the feature cache) reads `images(split)` through
  `ordered_loader` and gives the batches `resize_batch` with `batch_step_for` the data set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Subset

from finetune.data import loaders, val_split
from finetune.data.device_resize import SplitTransforms, split_transforms
from finetune.data.file_walk import paused_gc
from finetune.data.mixing import batch_mix, check_alpha, mix_training_batch
from finetune.data.skipping import SkipReport, collate_readable
from finetune.data.split_checks import check_enough_for_each_rank, check_readable
from finetune.data.subsets import drop_late_failures
from finetune.data.transforms import BatchResize, Preprocessing, auto_augment_step
from finetune.data.workers import default_num_workers, default_pin_memory, loader_workers
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")
SPLITS = ("train", "val", "test")
StandIn = Callable[[str], "Dataset | None"]  # split -> what its loader reads instead, or None: the images


class ImageDataModule(L.LightningDataModule):
    """Image classification data with transforms from the model's preprocessing.

    Sizes, mean and std left as None are taken from the pretrained weights: the entry point
    decides the preprocessing once (`decide_preprocessing`) and hands it to `use_preprocessing`.
    """

    def __init__(
        self, batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int | None = None,
        pin_memory: bool | None = None, persistent_workers: bool = True, prefetch_factor: int | None = None,
        resize_on_device: bool | None = None, image_size: int | None = None, train_image_size: int | None = None,
        resize_size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        interpolation: str | None = None, crop_scale: Sequence[float] | None = None, hflip: bool | None = None,
        augment: bool | None = None, auto_augment: str | None = None, mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0, val_fraction: float = 0.1, seed: int = 0, max_bad_fraction: float = 0.01,
        skipped_csv: str | None = None, split_file: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._num_workers_given = num_workers is not None
        self.pin_memory = default_pin_memory() if pin_memory is None else pin_memory
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.resize_on_device = resize_on_device
        self.overrides = {
            "crop_size": image_size, "resize_size": resize_size, "mean": mean, "std": std,
            "interpolation": interpolation, "crop_scale": crop_scale, "hflip": hflip, "augment": augment,
            "auto_augment": auto_augment, "train_crop_size": train_image_size,
        }
        self.mixup_alpha, self.cutmix_alpha = check_alpha("mixup_alpha", mixup_alpha), check_alpha(
            "cutmix_alpha", cutmix_alpha)
        auto_augment_step(auto_augment, "bilinear")  # an unknown name fails here, before any data
        if augment is False and auto_augment:  # the eval transform would silently drop it
            raise FinetuneError(f"data.auto_augment={auto_augment} needs the training transform, but "
                                "data.augment=false trains on the eval transform; set data.augment=true or "
                                "data.auto_augment=null")
        self.batch_mix = None
        self.seed, self.max_bad_fraction = seed, max_bad_fraction
        self.skip_report = SkipReport(skipped_csv)
        self.split_keeper = val_split.SplitKeeper(val_fraction, seed, split_file)  # val taken off train
        self.preprocessing = Preprocessing().override(**self.overrides)
        self._datasets: dict[str, Dataset] = {}
        self._transforms: SplitTransforms | None = None
        self._stand_in: StandIn | None = None
        self._stood_in: dict[str, bool] = {}  # split -> its last loader reads a stand-in

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    def make_split(self, split: str, transform: Callable | None) -> Dataset | None:
        """The data set for `split` with `transform` applied; None when the source has no such split."""
        raise NotImplementedError

    def source_size(self) -> int | None:
        """The longest side of the source images when known and uniform-ish, else None."""
        return None

    def training_loader(self, dataset: Dataset) -> DataLoader:
        """How training iterates `dataset` (the train images or a stand-in): shuffled, resumable.
        A source that streams overrides this, and only this, of the loaders."""
        settings = self.loader_settings("train")
        log.info("train loader: batch %d, %d workers, pin_memory %s", settings.batch_size, settings.num_workers,
                 self.pin_memory)
        return loaders.train_loader(dataset, settings, self.seed, self.trainer)

    # --- set-up ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mixes_batches(self) -> bool:
        """Training batches go through MixUp or CutMix (soft targets)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def random_training(self) -> bool:
        """The training data differs from epoch to epoch (random crops and flips, an auto-augment
        policy, MixUp/CutMix), so backbone features of it cannot be computed once and cached."""
        return bool(self.preprocessing.augment or self.preprocessing.auto_augment or self.mixes_batches)

    @property
    def datasets(self) -> Mapping[str, Dataset]:
        """The splits' images, read-only: a callback replaces a split with `use_stand_in`."""
        return MappingProxyType(self._datasets)

    @property
    def batch_transform(self) -> BatchResize | None:
        """Evaluation's per-batch step (tiny sources: resize + normalise on the device), else None."""
        return self._transforms.eval_batch if self._transforms else None

    @property
    def train_batch_transform(self) -> BatchResize | None:
        """Training's per-batch step (at `data.train_image_size`), else None."""
        return self._transforms.train_batch if self._transforms else None

    def source_preprocessing(self) -> dict[str, Any]:
        """The source's own preprocessing settings, which `decide_preprocessing` puts between the
        weights' and this config's `overrides`; none but a converted data set's (streaming.py)."""
        return {}

    def use_preprocessing(self, p: Preprocessing) -> None:
        """Transform with `p`, the run's one decided preprocessing (finetune.data.preprocessing),
        the same record the model holds."""
        self.preprocessing = p
        self._datasets.clear()

    def use_mixup(self, mixup_alpha: float) -> None:
        """MixUp as a recipe sized from the data chose (finetune.finetuning.sizing), as if configured."""
        self.mixup_alpha = check_alpha("mixup_alpha", mixup_alpha)
        self.batch_mix = batch_mix(self.mixup_alpha, self.cutmix_alpha, self.num_classes)

    @paused_gc()  # listing, checks and split of a million files: see file_walk.paused_gc
    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self._transforms = t = split_transforms(self.preprocessing, self.source_size(), self.resize_on_device)
        train, val = self.make_split("train", t.train), self.make_split("val", t.eval)
        if val is None:
            train, val = self.split_off_val(train, self.make_split("train", t.eval))
            drop_late_failures(val)  # evaluation drops a file that fails late
        self._datasets.update(train=train, val=val, test=self.make_split("test", t.eval))
        check_readable(self._datasets, self.skip_report, self.max_bad_fraction,
                       self.trainer is None or self.trainer.is_global_zero)
        check_enough_for_each_rank(self._datasets, self.trainer.world_size if self.trainer is not None else 1)
        self.batch_mix = batch_mix(self.mixup_alpha, self.cutmix_alpha, self.num_classes)

    def split_off_val(self, train: Dataset, train_eval: Dataset) -> tuple[Dataset, Dataset]:
        """A seeded fraction of train, seen through `train_eval` (the same images through another
        transform), becomes val; a resumed fit takes the split stored in its checkpoint instead."""
        trainer = self.trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.is_global_zero
        return self.split_keeper.take(train, train_eval, write_file=fitting)

    def resume_split_from(self, ckpt_path: str | os.PathLike) -> None:
        """Before a resumed fit sets up: validate on the split stored in `ckpt_path` (Lightning
        restores the data module's state only after `setup`, too late for the loaders' data)."""
        self.split_keeper.resume_from(ckpt_path, type(self).__qualname__)

    def state_dict(self) -> dict[str, Any]:
        """The validation split, so every checkpoint carries the one its run validated on."""
        return self.split_keeper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.split_keeper.load_state_dict(state_dict, set_up=bool(self._datasets))

    # --- the data contract -------------------------------------------------------------------
    def use_stand_in(self, stand_in: StandIn | None) -> None:
        """The one way to replace splits: `stand_in(split)` is asked each time `loader(split)` is
        built (so after a checkpoint restored the epoch) and what it returns, unless None, is read
        instead of the images. None: the images again."""
        self._stand_in = stand_in

    def images(self, split: str) -> Dataset:
        """`split`'s images (set up on first use), never a stand-in."""
        self.setup("fit")
        return self._datasets[split]

    def dataset(self, split: str) -> Dataset:
        """What `split`'s loader reads: the stand-in if one is offered, else the images."""
        stand_in = self._stand_in(split) if self._stand_in is not None else None
        return self._datasets[split] if stand_in is None else stand_in

    def loader(self, split: str) -> DataLoader:
        """The loader of `split` over `dataset(split)`: training's from `training_loader`,
        evaluation's in order, under DDP each image on one rank."""
        dataset = self.dataset(split)
        self._stood_in[split] = dataset is not self._datasets.get(split)
        if split == "train":
            return self.training_loader(dataset)
        return loaders.eval_loader(dataset, self.loader_settings(split), self.trainer)

    def ordered_loader(self, dataset: Dataset) -> DataLoader:
        """Every item of `dataset` once, in order, in this process (every rank reads all of it)."""
        return loaders.eval_loader(dataset, dataclasses.replace(self.loader_settings("val"),
                                                                persistent_workers=False), trainer=None)

    def loader_settings(self, split: str) -> loaders.LoaderSettings:
        """Batch size, workers (none for tiny sources trained on the CPU) and the rest for `split`."""
        workers = loader_workers(self.num_workers, self._num_workers_given, self.batch_transform is not None,
                                 self.trainer)
        return loaders.LoaderSettings(self.batch_size if split == "train" else self.eval_batch_size, workers,
                                      self.pin_memory, self.persistent_workers, self.prefetch_factor, self.collate)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")

    # --- batches -----------------------------------------------------------------------------
    @staticmethod
    def collate(batch: list) -> Any:
        """Batches of the samples that could be read (see `finetune.data.skipping`)."""
        return collate_readable(batch)

    def batch_step_for(self, dataset: Dataset) -> BatchResize | None:
        """The per-batch step that goes with `dataset`'s per-image transform (training's or
        evaluation's, e.g. LP-FT's `train_eval_view`): what code that runs batches itself uses."""
        self.setup("fit")
        return self._transforms.batch_step_for(dataset)

    @staticmethod
    def resize_batch(batch: Any, step: BatchResize | None) -> Any:
        """`step` (a `BatchResize`, or None: nothing) on the images of `batch`."""
        images, *rest = batch
        return batch if step is None else (step(images), *rest)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tiny sources arrive as uint8 at their own size: resize and normalise the whole batch here,
        to the train size while the Trainer trains, else to the eval size; then training batches go
        through MixUp/CutMix. A stand-in's batches pass as they are (see the module docstring)."""
        trainer = self.trainer
        if self._stood_in.get(_split_read_now(trainer), False):
            return batch
        training = trainer is not None and trainer.training
        batch = self.resize_batch(batch, self.train_batch_transform if training else self.batch_transform)
        return mix_training_batch(self.batch_mix, batch, trainer)

    def train_eval_view(self) -> Dataset:
        """The training images through the evaluation transform (no random crop, flip, policy):
        what a linear probe on cached features trains on (`finetune=lp_ft`). The same images as
        `images("train")`, in the same order."""
        train = self.images("train")
        p = self.preprocessing
        if not (p.augment or p.auto_augment) and p.train_size == p.crop_size:
            return train
        view = self.make_split("train", self._transforms.eval)
        if isinstance(train, Subset):  # val was split off train
            view = Subset(view, train.indices)
        if len(view) != len(train):
            raise RuntimeError(f"the training split seen through the eval transform has {len(view)} images, "
                               f"not {len(train)}")
        return view


def _split_read_now(trainer: L.Trainer | None) -> str | None:
    """The split whose batches the Trainer is reading: train while training, val while validating
    (its sanity check included), test while testing or predicting; None without a Trainer."""
    if trainer is None:
        return None
    if trainer.training:
        return "train"
    return "val" if trainer.validating or trainer.sanity_checking else "test"
