"""Exponential moving average of the weights: Lightning's `EMAWeightAveraging`, made to hold after fit.

Lightning's callback validates with the averaged weights, writes them as a checkpoint's
`state_dict` (the raw ones go to `current_model_state`, to resume from) and copies them into the
model when training ends; eval, predict and export read `state_dict`, so they get the average.
One gap is closed here: `trainer.test(ckpt_path="best")` on the trainer that fitted calls the
callback's `on_load_checkpoint` again, and Lightning's version then loads `current_model_state`,
so the test would score the raw weights while the checkpoint and the validation said average.
A second one too: Lightning copies the module in `setup`, before the strategy moves it to its
device and converts its precision, so on a GPU the average stayed on the CPU and every step
copied the weights to the host; `on_fit_start` moves it to where the module lives.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger("finetune")


class EMA(EMAWeightAveraging):
    """`EMAWeightAveraging` whose average is also what `trainer.test/validate/predict` load.

    `decay` weighs the old average at each optimizer step: the average spans roughly
    1 / (1 - decay) steps (1000 at 0.999), so it should be well below the run's step count.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self._decay = decay

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the average where the module now lives; warn when it would still be mostly the
        starting weights at the end of the run."""
        self._follow_module_placement(pl_module)
        span = 1.0 / (1.0 - self._decay) if self._decay < 1 else float("inf")
        steps = trainer.estimated_stepping_batches
        if steps < 3 * span:  # the starting weights keep over e^-3 = 5% of the average
            log.warning("EMA decay %.4g averages over ~%.0f optimizer steps but the run has %s: the averaged "
                        "weights stay close to the starting ones; lower callbacks.ema.decay (e.g. %.3g)",
                        self._decay, span, steps, max(0.5, 1 - 10 / max(steps, 1)))

    @torch.no_grad()
    def _follow_module_placement(self, pl_module: L.LightningModule) -> None:
        """Each tensor of the average on its module tensor's device and in its dtype (the strategy
        moved and converted the module after `setup` copied it); values are kept, so an average
        restored from a checkpoint (restored before the move) survives. An explicit `device`
        given to the callback is left as asked."""
        average = self._average_model
        if average is None or self._device is not None:
            return
        average.n_averaged = average.n_averaged.to(pl_module.device)
        pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.parameters(), pl_module.buffers()))
        for kept, live in pairs:
            if kept.device != live.device or kept.dtype != live.dtype:
                kept.data = kept.data.to(device=live.device, dtype=live.dtype)
        log.info("EMA average on %s", pl_module.device)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming fit: restore the average and the raw weights (Lightning's behaviour). Anything
        else (test, validate, predict): keep `state_dict`, the average, which is already loaded."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """`update_starting_at_epoch` holds for the per-step updates too (Lightning's rule checks
        the step condition first, which passes from step 0 when no start step is set)."""
        if self.update_starting_at_epoch is not None and trainer.current_epoch < self.update_starting_at_epoch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _follow_until_first_update(self, pl_module: L.LightningModule) -> None:
        """An average of no updates is the model as it trains, not the copy Lightning made at
        setup: without this, validation and checkpoints before the first update (LP-FT's stage 1
        with `update_starting_at_epoch`) would score and save the starting weights."""
        average = self._average_model
        if average is not None and int(average.n_averaged) == 0:
            average.module.load_state_dict(pl_module.state_dict())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow_until_first_update(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._follow_until_first_update(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow_until_first_update(pl_module)
        super().on_train_end(trainer, pl_module)
