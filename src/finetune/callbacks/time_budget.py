"""`budget_minutes=N`: a fine-tuning run that ends inside N minutes with its schedule complete.

A fixed number of epochs either wastes the time a researcher has or is cut off mid-schedule (the
learning rate still high). Instead, after `measure_steps` optimizer steps of the fine-tuning stage
(inside the warmup), this callback knows the cost of a training step and of a validation pass, so
it plans the number of whole epochs that fit in what is left of the budget (a share kept for the
final test), sets `max_epochs`, and stretches or shrinks a step-based schedule (`WarmupCosine`'s
`total_steps`) to end at zero there. The plan is printed, kept in checkpoints and reused on resume.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L

from finetune.errors import FinetuneError

log = logging.getLogger("finetune")


class TimeBudget(L.Callback):
    """Plan the epochs of a fit to end within `minutes` of wall time (None: off)."""

    def __init__(self, minutes: float | None = None, measure_steps: int = 10, test_share: float = 0.05) -> None:
        if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
            raise FinetuneError(f"budget_minutes={minutes!r} must be a positive number of minutes, or null")
        self.minutes = minutes
        self.measure_steps = measure_steps
        self.test_share = test_share
        self.planned_epochs: int | None = None
        self._start = self._measure_from = self._val_started = None
        self._measured = 0
        self._val_seconds = 0.0

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return {"planned_epochs": self.planned_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.planned_epochs = state_dict.get("planned_epochs")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.minutes is None:
            return
        self._start = self.now()
        if self.planned_epochs is not None:  # resumed: the plan stands
            trainer.fit_loop.max_epochs = self.planned_epochs

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.minutes is None or self.planned_epochs is not None or self._measure_from is not None:
            return
        if trainer.current_epoch >= getattr(pl_module, "finetune_starts_at_epoch", 0):
            self._measure_from, self._measured = self.now(), 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_started = self.now()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_started is not None and not trainer.sanity_checking:
            self._val_seconds = self.now() - self._val_started

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._measure_from is None or self.planned_epochs is not None:
            return
        self._measured += 1
        if self._measured >= self.measure_steps:
            self.plan(trainer, (self.now() - self._measure_from) / self._measured)

    def plan(self, trainer: L.Trainer, step_seconds: float) -> None:
        """Whole epochs that fit in the budget left; the step-based schedule ends with the last."""
        per_epoch = max(1, trainer.num_training_batches)
        epoch_seconds = step_seconds * per_epoch + self._val_seconds
        left = self.minutes * 60 * (1 - self.test_share) - (self.now() - self._start)
        # The current epoch is under way: what is left of it, then whole epochs.
        rest_of_epoch = step_seconds * max(0, per_epoch - trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        more = max(0, math.floor((left - rest_of_epoch - self._val_seconds) / epoch_seconds))
        self.planned_epochs = trainer.current_epoch + 1 + more
        trainer.fit_loop.max_epochs = self.planned_epochs
        total_steps = self.planned_epochs * math.ceil(per_epoch / trainer.accumulate_grad_batches)
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "total_steps"):
                config.scheduler.total_steps = total_steps
        log.info("time budget %g min: %.3g s per step, %.3g s per validation -> %d epochs (%d optimizer steps); "
                 "the schedule ends there", self.minutes, step_seconds, self._val_seconds, self.planned_epochs,
                 total_steps)
