"""`sizing:` a fine-tuning recipe that sizes itself from the data (BiT's HyperRule, re-tuned here).

A fixed recipe carries someone else's data in its numbers: "3 epochs" is 84 optimizer steps on
900 photos and 375 on 4,000, and 224-px training pays full price on 32-px photos. Kolesnikov et
al. (BiT, 2020) size fine-tuning from the data instead: the resolution from the image size, the
schedule's length from the number of images, MixUp only where there is enough data to need it.
`plan_recipe` does that once, after the data module has listed and split its images and before
the trainer and the schedule exist; `train.build` applies the plan and prints it in one line.

Every choice stays the user's to make: a value given on the command line or in the experiment
(`data.train_image_size`, `data.mixup_alpha`, `sizing.finetune_steps`, ...) is kept and named as
such in the printed line; `sizing=null` turns the rule off. The numbers are this project's own,
tuned on a development split of CIFAR-10 photos (README "Recipes"), not on a test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError

AUTO = "auto"


@dataclass(frozen=True)
class Rule:
    """The thresholds of the rule; each is a `sizing.*` config value."""

    small_source_px: int = 96  # BiT: photos whose longer side is at most this count as small
    small_train_size: int = 160  # FixRes: small photos train at this crop, evaluation keeps its own size (tuned on val)
    small_data: int = 20_000  # below this many training images: the short schedule, no MixUp
    small_data_steps: int = 500  # BiT's 500 steps for data sets under 20k images
    large_data_steps: int = 10_000  # BiT's 10k steps up to 500k images (20k above: capped by epochs here)
    min_epochs: int = 3  # never fewer passes over the data than this
    mixup_alpha: float = 0.1  # BiT's MixUp for data sets of at least `small_data` images


@dataclass(frozen=True)
class Plan:
    """What the rule chose, and the words that say it."""

    train_image_size: int | None  # None: train at the evaluation crop
    finetune_epochs: int
    finetune_steps: int
    max_epochs: int
    mixup_alpha: float
    line: str

    def apply(self, datamodule: Any, decided: Preprocessing) -> Preprocessing:
        """The data module trains at the planned crop with the planned MixUp; returns the run's
        preprocessing (the decided one, with the planned training crop) for the model to hold."""
        if self.train_image_size is not None and self.train_image_size != decided.train_crop_size:
            decided = decided.override(train_crop_size=self.train_image_size)
            datamodule.use_preprocessing(decided)
        datamodule.use_mixup(self.mixup_alpha)
        return decided


def _given(value: object) -> bool:
    return value is not None and value != AUTO


def choose_train_size(rule: Rule, source_size: int | None, eval_size: int, given: object) -> tuple[int | None, str]:
    """FixRes for small photos: their detail is gone at any crop above ~4x their size, so training
    at a lower resolution costs little accuracy and saves most of a step's time."""
    if _given(given):
        return int(given), f"train at {given} px (data.train_image_size, yours)"
    if source_size is not None and source_size <= rule.small_source_px and rule.small_train_size < eval_size:
        return rule.small_train_size, (f"train at {rule.small_train_size} px, evaluate at {eval_size} "
                                       f"(photos of <= {source_size} px; data.train_image_size)")
    return None, f"train and evaluate at {eval_size} px (data.train_image_size)"


def choose_steps(rule: Rule, n_train: int, steps_per_epoch: int, given: object) -> tuple[int, str]:
    """Fine-tuning epochs: BiT's schedule length for the data set's size, at least `min_epochs`."""
    if _given(given):
        steps, whose = int(given), "sizing.finetune_steps, yours"
    else:
        steps = rule.small_data_steps if n_train < rule.small_data else rule.large_data_steps
        whose = f"sizing.finetune_steps: {steps} for {'<' if n_train < rule.small_data else '>='} " \
                f"{rule.small_data:,} images"
    epochs = max(rule.min_epochs if not _given(given) else 1, round(steps / steps_per_epoch))
    return epochs, f"{epochs} fine-tuning epochs = {epochs * steps_per_epoch} steps ({whose})"


def choose_mixup(rule: Rule, n_train: int, given: object) -> tuple[float, str]:
    """MixUp regularises long schedules on large data; on a few hundred steps it only adds noise."""
    if _given(given):
        return float(given), f"MixUp alpha {given} (yours)"
    if n_train >= rule.small_data:
        return rule.mixup_alpha, f"MixUp alpha {rule.mixup_alpha} (>= {rule.small_data:,} images; sizing.mixup_alpha=0 turns it off)"
    return 0.0, f"no MixUp (< {rule.small_data:,} images; sizing.mixup_alpha)"


def plan_recipe(rule: Rule, *, n_train: int, source_size: int | None, eval_size: int, batch_size: int,
                finetune_starts_at: int, warmup_fraction: float = 0.0, train_image_size: object = AUTO,
                finetune_steps: object = AUTO, mixup_alpha: object = AUTO, max_epochs: int | None = None) -> Plan:
    """The plan for `n_train` training images of longer side `source_size` (None: unknown or mixed).
    `finetune_starts_at`: the epoch the backbone starts to train (LP-FT's `lp_epochs`); the
    schedule's `warmup_fraction` is only reported. A given `max_epochs` (the user's
    `trainer.max_epochs`) wins over the rule's schedule length."""
    if n_train < 1:
        raise FinetuneError("sizing: the training split is empty; nothing to size the recipe from")
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    size, size_words = choose_train_size(rule, source_size, eval_size, train_image_size)
    epochs, step_words = choose_steps(rule, n_train, steps_per_epoch, finetune_steps)
    if max_epochs is not None:
        epochs = max(0, max_epochs - finetune_starts_at)
        step_words = f"{epochs} fine-tuning epochs = {epochs * steps_per_epoch} steps (trainer.max_epochs={max_epochs}, yours)"
    alpha, mix_words = choose_mixup(rule, n_train, mixup_alpha)
    warmup = round(warmup_fraction * epochs * steps_per_epoch)
    # Steps are counted at `batch_size` on one device: under DDP each step sees devices x batch images.
    line = (f"recipe sized from the data ({n_train:,} training images, batch {batch_size} per device, "
            f"{f'{source_size} px' if source_size else 'size unknown'}): {size_words}; {step_words}, "
            f"{warmup} of them warm-up, cosine to zero; {mix_words}")
    return Plan(size, epochs, epochs * steps_per_epoch, finetune_starts_at + epochs, alpha, line)


def finetune_start(cfg: DictConfig) -> int:
    """The epoch the backbone starts to train, from the strategy's config."""
    callback = (cfg.get("finetune") or {}).get("callback") or {}
    target = str(callback.get("_target_", ""))
    if target.endswith(".Frozen") or not target:
        raise FinetuneError(f"sizing sizes a fine-tuning schedule, but finetune={cfg.finetune.get('name')} trains "
                            "no backbone; set sizing=null, or finetune=lp_ft / full / gradual")
    return int(callback.get("lp_epochs", callback.get("unfreeze_at_epoch", 0)))


def size_from_data(cfg: DictConfig, datamodule: Any, eval_size: int) -> Plan:
    """The plan for this run: `cfg.sizing`'s values and thresholds, the data module's training split
    (set up here; later setups reuse its listing and file checks) and what the user set elsewhere."""
    sizing = dict(cfg.sizing)
    chosen = {key: sizing.pop(key, AUTO) for key in ("train_image_size", "finetune_steps", "mixup_alpha")}
    unknown = set(sizing) - set(Rule.__dataclass_fields__)
    if unknown:
        raise FinetuneError(f"sizing has unknown keys {sorted(unknown)}: use train_image_size, finetune_steps, "
                            f"mixup_alpha or one of {sorted(Rule.__dataclass_fields__)}")
    if cfg.data.get("train_image_size") is not None:
        chosen["train_image_size"] = cfg.data.train_image_size
    if cfg.data.get("mixup_alpha"):
        chosen["mixup_alpha"] = cfg.data.mixup_alpha
    scheduler = cfg.model.get("scheduler") or {}
    return plan_recipe(Rule(**sizing), n_train=len(datamodule.images("train")), source_size=datamodule.source_size(),
                       eval_size=eval_size, batch_size=int(cfg.data.batch_size), finetune_starts_at=finetune_start(cfg),
                       warmup_fraction=float(scheduler.get("warmup_fraction", 0.0)),
                       max_epochs=cfg.trainer.get("max_epochs"), **chosen)
