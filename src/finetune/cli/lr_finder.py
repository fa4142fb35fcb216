"""`tune_lr=true`: Lightning's learning-rate range test before fitting.

The test raises the rate exponentially over a few batches and suggests the one where the loss
falls fastest; the suggestion replaces the optimizer's base rate (parameter-group multipliers
still apply on top), and the loss-vs-rate curve goes to TensorBoard (IMAGES, `lr_finder`) and
`lr_finder.png` in the run dir, so the choice can be checked by eye.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner
from matplotlib.figure import Figure

from finetune.callbacks.grid import tensorboard
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")


def tune_learning_rate(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule,
                       save_dir: str | Path | None = None, **lr_find_args) -> float | None:
    """Run the range test, apply and return its suggestion (None: no suggestion, nothing changed)."""
    factory = model.hparams.get("optimizer")  # its config dict (finetune.models.factory_config)
    if not isinstance(factory, Mapping) or "lr" not in factory:
        raise FinetuneError("tune_lr=true needs model.optimizer as a config with _partial_: true and an lr")
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = -1  # the search is bounded by its batch count, not by max_epochs
    try:
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, update_attr=False, **lr_find_args)
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    if finder is None:  # fast_dev_run: Lightning skips the search
        return None
    suggestion = finder.suggestion()
    figure = Figure(figsize=(6, 4), dpi=100)
    finder.plot(suggest=True, ax=figure.add_subplot())
    figure.axes[0].set_title(f"suggested lr: {suggestion:.2e}" if suggestion else "no suggestion")
    if save_dir is not None and trainer.is_global_zero:
        figure.savefig(Path(save_dir) / "lr_finder.png")
    writer = tensorboard(trainer)
    if writer is not None:
        writer.add_figure("lr_finder", figure, global_step=0, close=True)
        if suggestion:
            writer.add_scalar("lr_finder/suggestion", suggestion, global_step=0)
    if not suggestion:
        log.warning("lr finder: no suggestion (too few batches or a flat loss); keeping lr=%s",
                    factory.get("lr"))
        return None
    previous = factory.get("lr")
    factory["lr"] = suggestion  # in place: configure_optimizers builds the optimizer from this config
    if trainer.is_global_zero:
        print(f"lr finder: suggested learning rate {suggestion:.3g} (was {previous}); using it")
    return suggestion
