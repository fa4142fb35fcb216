"""Which resizing happens per image on the CPU and which per batch on the device, for training and
for evaluation.

Most sources are resized and cropped per image. Tiny ones (`upsample_on_device`, or
`data.resize_on_device=true`) are cropped at their own size and upsampled + normalised per batch
(`BatchResize`), which is where each split's per-batch step comes from. Training's step differs
from evaluation's when `data.train_image_size` differs from the crop size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from finetune.data.subsets import innermost
from finetune.data.transforms import (
    BatchResize,
    Preprocessing,
    eval_pipeline,
    native_train_transform,
    train_transform,
)

log = logging.getLogger("finetune")


@dataclass(frozen=True)
class SplitTransforms:
    """The per-image transform and per-batch step (None: nothing) of training and of evaluation."""

    train: Callable
    eval: Callable
    train_batch: BatchResize | None
    eval_batch: BatchResize | None

    def batch_step_for(self, dataset: Dataset) -> BatchResize | None:
        """The per-batch step that goes with `dataset`'s per-image transform: training's for the
        training transform, evaluation's for the eval transform."""
        if self.train_batch is self.eval_batch:
            return self.eval_batch
        transform = getattr(innermost(dataset), "transform", None)
        if transform is self.train:
            return self.train_batch
        if transform is self.eval:
            return self.eval_batch
        raise RuntimeError(f"no per-batch step is known for a data set with the transform {transform!r}: "
                           "it is neither this datamodule's training nor its evaluation transform")


def split_transforms(p: Preprocessing, source_size: int | None, resize_on_device: bool | None) -> SplitTransforms:
    """The transforms of `p` for a source whose images are `source_size` px (None: unknown);
    `resize_on_device` None chooses from the size (`finetune.data.transforms.eval_pipeline`)."""
    if p.train_size > max(p.resize_size, p.crop_size):
        log.warning("data.train_image_size=%d is above the eval sizes: JPEGs are decoded at reduced scale "
                    "(and data.cache copies kept) down to a short side of %d px, so training crops may be "
                    "upsampled from them; set data.resize_size >= %d for full detail", p.train_size,
                    max(p.resize_size, p.crop_size), p.train_size)
    pipeline = eval_pipeline(p, source_size, resize_on_device)  # shared with predict, export
    train = train_transform(p) if pipeline.native is None else native_train_transform(p, pipeline.native)
    same_size = p.train_size == p.crop_size
    train_batch = pipeline.batch if pipeline.batch is None or same_size else BatchResize(p.for_training())
    return SplitTransforms(train, pipeline.transform, train_batch, pipeline.batch)
