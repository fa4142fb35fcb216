"""MixUp and CutMix: training batches mixed on the device, after they are resized and normalised."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchvision.transforms import v2

from finetune.errors import FinetuneError


def check_alpha(name: str, value: float) -> float:
    """`data.<name>` as a float, or a one-line error for a value that is no Beta alpha."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise FinetuneError(f"data.{name}={value} is out of range; use a Beta alpha >= 0 (0: off; 0.2 to 1.0 is usual)")
    return float(value)


def batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """torchvision's MixUp and/or CutMix (one of the two per batch, at random, when both are on, as
    timm and torchvision's reference recipes do); None when both alphas are 0. The labels they
    return are soft: (N, num_classes) rows that sum to 1."""
    steps = [cls(alpha=float(alpha), num_classes=num_classes)
             for cls, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.RandomChoice(steps)


def mix_training_batch(mix: v2.Transform | None, batch: Any, trainer: L.Trainer | None) -> Any:
    """`mix` on a batch that is about to be trained on: the Trainer is in its training stage and
    gradients are on. Validation, test and predict batches, and batches read under `torch.no_grad`
    while training, stay as they are."""
    if mix is None or trainer is None or not trainer.training or not torch.is_grad_enabled():
        return batch
    images, targets = batch
    return mix(images, targets)
