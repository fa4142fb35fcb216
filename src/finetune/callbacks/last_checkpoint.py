"""`LastCheckpoint`: last.ckpt at the end of every epoch and, optionally, every N steps or seconds.

Lightning's `ModelCheckpoint` takes one trigger (`every_n_epochs`, `every_n_train_steps` or
`train_time_interval`, mutually exclusive). Resuming after a kill wants two: the end of each epoch
(after validation, so the checkpoint holds that epoch's best score) and a bound on the work a kill
loses inside a long epoch.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.errors import FinetuneError


class LastCheckpoint(ModelCheckpoint):
    """A monitor-less `ModelCheckpoint` (use `filename: last`) that saves after every epoch, plus
    every `every_n_train_steps` optimizer steps and/or every `train_time_interval` seconds mid-epoch.

    The last step of an epoch is left to the end-of-epoch save, which comes after validation.
    """

    def __init__(self, every_n_train_steps: int | None = None,
                 train_time_interval: float | timedelta | None = None, **kwargs: Any) -> None:
        if isinstance(train_time_interval, (int, float)):
            train_time_interval = timedelta(seconds=train_time_interval)
        if kwargs.pop("every_n_epochs", 1) != 1:
            raise FinetuneError("last_checkpoint saves after every epoch: remove its every_n_epochs, "
                                "or set every_n_train_steps / train_time_interval for more saves")
        super().__init__(every_n_train_steps=every_n_train_steps, train_time_interval=train_time_interval,
                         **kwargs)
        self._every_n_epochs = 1  # ModelCheckpoint turns the epoch trigger off when another is set

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
