"""Parameter counts of every run: how much of the network the fine-tuning strategy trains."""

from __future__ import annotations

import logging

import lightning as L

from finetune.runtime import parameter_counts

log = logging.getLogger("finetune")


class ParameterCounts(L.Callback):
    """Logs `params/total`, `params/trainable` and `params/trainable_fraction` (to the loggers and
    the console) when training starts, after the strategy has frozen what it freezes, and again at
    an epoch start where the trainable count changed (`finetune=gradual` unfreezing the backbone)."""

    def __init__(self) -> None:
        self.trainable: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_if_changed(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_if_changed(trainer, pl_module)

    def _log_if_changed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = parameter_counts(pl_module)
        if counts["params/trainable"] == self.trainable:
            return
        self.trainable = int(counts["params/trainable"])
        if trainer.is_global_zero:
            log.info("parameters: %s total, %s trainable (%.2f%%) at epoch %d", f"{int(counts['params/total']):,}",
                     f"{self.trainable:,}", 100 * counts["params/trainable_fraction"], trainer.current_epoch)
        for logger in trainer.loggers:
            logger.log_metrics(counts, step=trainer.global_step)
