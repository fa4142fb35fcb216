"""The DataModule every data set shares: transforms, the validation split and the loaders.

Subclasses only say where the images come from (`classes`, `prepare_data`, `make_split`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from finetune.data import val_split
from finetune.data.file_checks import SkipReport, collate_readable
from finetune.data.resumable_loader import resumable_train_loader
from finetune.data.transforms import (
    BatchResize,
    Preprocessing,
    auto_augment_step,
    eval_pipeline,
    native_train_transform,
    train_transform,
    upsample_on_device,  # noqa: F401  (its former home; folder.py imports it from here)
)
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")
SPLITS = ("train", "val", "test")


def available_cpus() -> int:
    """CPUs this process may use (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Leave one core to the training process; never more than 8 workers."""
    return max(0, min(8, available_cpus() - 1))


def default_pin_memory() -> bool:
    """Pinned host memory only pays for copies to a CUDA device."""
    return torch.cuda.is_available()


def batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """torchvision's MixUp and/or CutMix (one of the two per batch, at random, when both are on, as
    timm and torchvision's reference recipes do); None when both alphas are 0. The labels they
    return are soft: (N, num_classes) rows that sum to 1."""
    steps = [cls(alpha=float(alpha), num_classes=num_classes)
             for cls, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.RandomChoice(steps)


def _check_alpha(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise FinetuneError(f"data.{name}={value} is out of range; use a Beta alpha >= 0 (0: off; 0.2 to 1.0 is usual)")
    return float(value)


def _innermost(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class ImageDataModule(L.LightningDataModule):
    """Image classification data with transforms from the model's preprocessing.

    Sizes, mean and std left as None are taken from the pretrained weights: the entry point
    decides the preprocessing once (`decide_preprocessing`) and hands it to `use_preprocessing`.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        resize_on_device: bool | None = None,
        image_size: int | None = None,
        train_image_size: int | None = None,
        resize_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        crop_scale: Sequence[float] | None = None,
        hflip: bool | None = None,
        augment: bool | None = None,
        auto_augment: str | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        val_fraction: float = 0.1,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
        skipped_csv: str | None = None,
        split_file: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._num_workers_given = num_workers is not None
        self.pin_memory = default_pin_memory() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.resize_on_device = resize_on_device
        # Tiny sources: the per-batch step of evaluation's per-image transform, and of training's.
        self.batch_transform: BatchResize | None = None
        self.train_batch_transform: BatchResize | None = None
        self.persistent_workers = persistent_workers
        self.overrides = {
            "crop_size": image_size, "resize_size": resize_size, "mean": mean, "std": std,
            "interpolation": interpolation, "crop_scale": crop_scale, "hflip": hflip, "augment": augment,
            "auto_augment": auto_augment, "train_crop_size": train_image_size,
        }
        self.mixup_alpha = _check_alpha("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = _check_alpha("cutmix_alpha", cutmix_alpha)
        auto_augment_step(auto_augment, "bilinear")  # an unknown name fails here, before any data
        if augment is False and auto_augment:  # the eval transform would silently drop it
            raise FinetuneError(f"data.auto_augment={auto_augment} needs the training transform, but "
                                "data.augment=false trains on the eval transform; set data.augment=true or "
                                "data.auto_augment=null")
        self.batch_mix: v2.Transform | None = None
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_bad_fraction = max_bad_fraction
        self.skip_report = SkipReport(skipped_csv)
        # The validation images taken off train (finetune.data.val_split): in every checkpoint
        # (state_dict) and, for people, in `split_file`; a resumed fit reuses its checkpoint's.
        self.split_file = split_file
        self.val_split: dict[str, Any] | None = None
        self._stored_split: dict[str, Any] | None = None
        self._resumed_from: str | None = None
        self.preprocessing = Preprocessing().override(**self.overrides)
        self.datasets: dict[str, Dataset] = {}
        # A callback's stand-in for a split's images, asked each time a loader is built (so after
        # a checkpoint restored the epoch): LP-FT's cached features in its first stage.
        self.stand_in: Callable[[str], Dataset | None] | None = None

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    def make_split(self, split: str, transform) -> Dataset | None:
        """The data set for `split` with `transform` applied; None when the source has no such split."""
        raise NotImplementedError

    def source_size(self) -> int | None:
        """The longest side of the source images when known and uniform-ish, else None."""
        return None

    # --- shared -------------------------------------------------------------------------------
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

    def source_preprocessing(self) -> dict[str, Any]:
        """The source's own preprocessing settings, which `decide_preprocessing` puts between the
        weights' and this config's `overrides`; none but a converted data set's (streaming.py)."""
        return {}

    def use_preprocessing(self, p: Preprocessing) -> None:
        """Transform with `p`, the run's one decided preprocessing (finetune.data.preprocessing),
        the same record the model holds."""
        self.preprocessing = p
        self.datasets.clear()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        p = self.preprocessing
        if p.train_size > max(p.resize_size, p.crop_size):
            log.warning("data.train_image_size=%d is above the eval sizes: JPEGs are decoded at reduced scale "
                        "(and data.cache copies kept) down to a short side of %d px, so training crops may be "
                        "upsampled from them; set data.resize_size >= %d for full detail", p.train_size,
                        max(p.resize_size, p.crop_size), p.train_size)
        pipeline = eval_pipeline(p, self.source_size(), self.resize_on_device)  # shared with predict, export
        eval_tf, self.batch_transform = pipeline.transform, pipeline.batch
        train_tf = train_transform(p) if pipeline.native is None else native_train_transform(p, pipeline.native)
        same_size = p.train_size == p.crop_size
        self.train_batch_transform = (self.batch_transform if pipeline.batch is None or same_size
                                      else BatchResize(p.for_training()))
        self._eval_tf, self._train_tf = eval_tf, train_tf
        train, val = self.make_split("train", train_tf), self.make_split("val", eval_tf)
        if val is None:
            train, val = self._split_off_val(train, self.make_split("train", eval_tf))
            if hasattr(_innermost(val), "replace"):
                _innermost(val).replace = False  # evaluation drops a file that fails late
        self.datasets = {"train": train, "val": val, "test": self.make_split("test", eval_tf)}
        self._check_readable()
        self._check_enough_for_each_rank()
        self.batch_mix = batch_mix(self.mixup_alpha, self.cutmix_alpha, self.num_classes)

    def train_eval_view(self) -> Dataset:
        """The training images through the evaluation transform (no random crop, flip, policy):
        what a linear probe on cached features trains on (`finetune=lp_ft`). The same images as
        `datasets["train"]`, in the same order."""
        self.setup("fit")
        train = self.datasets["train"]
        p = self.preprocessing
        if not (p.augment or p.auto_augment) and p.train_size == p.crop_size:
            return train
        view = self.make_split("train", self._eval_tf)
        if isinstance(train, Subset):  # val was split off train
            view = Subset(view, train.indices)
        if len(view) != len(train):
            raise RuntimeError(f"the training split seen through the eval transform has {len(view)} images, "
                               f"not {len(train)}")
        return view

    def batch_step_for(self, dataset: Dataset) -> BatchResize | None:
        """The per-batch step that goes with `dataset`'s per-image transform: training's (train
        size) for the training transform, evaluation's for the eval transform (val, test, LP-FT's
        `train_eval_view`). Code that runs batches itself (the feature cache) must use this one."""
        if self.train_batch_transform is self.batch_transform:
            return self.batch_transform
        transform = getattr(_innermost(dataset), "transform", None)
        if transform is self._train_tf:
            return self.train_batch_transform
        if transform is self._eval_tf:
            return self.batch_transform
        raise RuntimeError(f"no per-batch step is known for a data set with the transform {transform!r}: "
                           "it is neither this datamodule's training nor its evaluation transform")

    def _check_readable(self) -> None:
        """Report the files each split left out as unreadable (sources that read files mark them as
        `skipped`, see `finetune.data.file_checks`), then refuse a split that lost more than
        `max_bad_fraction` of its files or has nothing left, before any training."""
        rank_zero = self.trainer is None or self.trainer.is_global_zero
        reported = set()
        for split, dataset in self.datasets.items():
            source = _innermost(dataset)
            skipped, total = getattr(source, "skipped", {}), getattr(source, "total_files", len(source))
            name = getattr(source, "split", split)
            where = str(getattr(source, "root", split))  # val split off train: train's files
            if where not in reported:
                reported.add(where)
                if rank_zero:
                    self.skip_report.add(name, skipped, total)
                if skipped and len(skipped) > self.max_bad_fraction * total:
                    raise FinetuneError(
                        f"{len(skipped)} of {total} files of the {name} split are not readable images, "
                        f"over data.max_bad_fraction={self.max_bad_fraction}; see "
                        f"{self.skip_report.path or 'the log'} for which and why, then fix or remove them, "
                        "or raise data.max_bad_fraction (1.0 accepts any number)"
                    )
            if len(dataset) == 0:
                raise FinetuneError(
                    f"the {split} split has no readable image left ({len(skipped)} of {total} files "
                    f"unreadable, see {self.skip_report.path or 'the log'}); add images to it"
                )

    def _check_enough_for_each_rank(self) -> None:
        """Under DDP every rank needs an image of each evaluated split: val and test images go to
        exactly one rank each (`_eval_sampler`), and a rank left without a batch never joins the
        gathers of the metrics and the calibration, so the others would wait for it forever."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        for split in ("val", "test"):
            dataset = self.datasets.get(split)
            if world > 1 and dataset is not None and len(dataset) < world:
                raise FinetuneError(
                    f"the {split} split has {len(dataset)} image{'s' if len(dataset) != 1 else ''} for {world} "
                    f"processes: under DDP each process evaluates its own share and needs at least one; add "
                    f"{split} images (data.val_fraction when val is taken off train) or run on fewer devices "
                    f"(trainer.devices={max(1, len(dataset))})")

    def _split_off_val(self, train: Dataset, train_eval: Dataset) -> tuple[Dataset, Dataset]:
        """A seeded fraction of train, seen through the eval transform, becomes val; a resumed fit
        takes the split stored in its checkpoint instead (`resume_split_from`, finetune.data.val_split)."""
        stored = self._stored_split
        if stored is None and self._resumed_from:
            log.warning("%s holds no validation split (written before splits were stored): it is drawn again "
                        "from data.seed; if train's files changed since, validation may hold images already "
                        "trained on", self._resumed_from)
        if stored is None:
            train_idx, val_idx, self.val_split = val_split.draw(train, self.val_fraction, self.seed)
        else:
            train_idx, val_idx = val_split.reuse(train, stored, self.val_fraction, self.seed)
            self.val_split = stored
        trainer = self.trainer
        if self.split_file and trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.is_global_zero:
            val_split.write(self.split_file, self.val_split)
        return Subset(train, train_idx), Subset(train_eval, val_idx)

    def resume_split_from(self, ckpt_path: str | os.PathLike) -> None:
        """Before a resumed fit sets up: validate on the split stored in `ckpt_path` (Lightning
        restores the data module's state only after `setup`, too late for the loaders' data)."""
        self._resumed_from = str(ckpt_path)
        self._stored_split = val_split.stored_in_checkpoint(ckpt_path, type(self).__qualname__)

    def state_dict(self) -> dict[str, Any]:
        """The validation split, so every checkpoint carries the one its run validated on."""
        return {val_split.KEY: self.val_split} if self.val_split is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Before `setup`: the split to reuse. After it (Lightning restores a checkpoint once the
        data is set up): the split in use must be that one (`setup` read it from the checkpoint)."""
        stored = state_dict.get(val_split.KEY)
        if stored is None:
            return
        if not self.datasets:
            self._stored_split = stored
        elif stored != self.val_split:
            raise RuntimeError("the validation split in use is not the one stored in the checkpoint being restored")

    def loader_workers(self) -> int:
        """`num_workers`, except for tiny sources trained on the CPU, which load in the main process.

        Their per-image work (~0.3 ms for a 32-pixel JPEG) costs less than a worker process
        takes from compute threads that already use every core (benchmarks/throughput.py).
        """
        if self._num_workers_given or self.batch_transform is None or self.trainer is None:
            return self.num_workers
        return 0 if self.trainer.strategy.root_device.type == "cpu" else self.num_workers

    def dataset(self, split: str) -> Dataset:
        """What `split`'s loader reads: the stand-in if a callback offers one, else the images."""
        stand_in = self.stand_in(split) if self.stand_in is not None else None
        return self.datasets[split] if stand_in is None else stand_in

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        batch_size = self.batch_size if split == "train" else self.eval_batch_size
        workers = self.loader_workers()
        common = {
            "batch_size": batch_size,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and workers > 0,
            "prefetch_factor": self.prefetch_factor if workers > 0 else None,
            "collate_fn": self.collate,
        }
        if split == "train":
            log.info("train loader: batch %d, %d workers, pin_memory %s", batch_size, workers, self.pin_memory)
            # Its position, shuffle and worker RNGs go into checkpoints: a resumed run sees the
            # batches the killed one had not, in the same order and with the same augmentations.
            trainer = self.trainer
            return resumable_train_loader(
                dataset, num_workers=workers, seed=self.seed,
                num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
                drop_last=len(dataset) > batch_size,  # a last batch of one image breaks BatchNorm
                **common)
        # A generator of its own: creating the iterator draws the workers' base seed, and from the
        # global RNG that draw would shift dropout and crops after a resume (no sanity check runs
        # then, so persistent val workers start at a different point of the global stream).
        return DataLoader(dataset, shuffle=shuffle, sampler=self._eval_sampler(dataset),
                          num_workers=workers, generator=torch.Generator(), **common)

    @staticmethod
    def collate(batch: list) -> Any:
        """Batches of the samples that could be read (see `finetune.data.file_checks`)."""
        return collate_readable(batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tiny sources arrive as uint8 at their own size; resize and normalise the whole batch here,
        to the train size while the Trainer trains, else to the eval size. Then training batches go
        through MixUp/CutMix (`mix_batch`).

        Code that iterates the loaders itself (not through the Trainer) calls `resize_batch` with
        the step of the data set it reads (`batch_step_for`).
        """
        trainer = self.trainer
        step = self.train_batch_transform if trainer is not None and trainer.training else self.batch_transform
        return self.mix_batch(self.resize_batch(batch, step))

    @staticmethod
    def resize_batch(batch: Any, step: BatchResize | None) -> Any:
        """`step` (a `BatchResize`, or None: nothing) on the images of `batch`."""
        images, *rest = batch
        if step is not None and images.dim() == 4:  # 2-D: cached features
            batch = (step(images), *rest)
        return batch

    def mix_batch(self, batch: Any) -> Any:
        """MixUp/CutMix on a batch that is about to be trained on: the Trainer is in its training
        stage and gradients are on. Validation, test and predict batches, and batches read under
        `torch.no_grad` while training (the frozen-feature cache computing features), stay as they are."""
        trainer = self.trainer
        if self.batch_mix is None or trainer is None or not trainer.training or not torch.is_grad_enabled():
            return batch
        images, targets = batch
        if images.dim() != 4:  # LP-FT's first stage trains the head on cached features: mixing starts after
            return batch
        return self.batch_mix(images, targets)

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
