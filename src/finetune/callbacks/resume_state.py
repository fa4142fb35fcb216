"""`ResumeState`: the process's RNG states go into every checkpoint and come back on resume.

Lightning restores weights, optimizer, schedulers, loops and (for a resumable train loader, see
`finetune.data.resumable_loader`) the position in the epoch, but not the global RNGs. Without
them a resumed run draws other random crops (when the main process loads the data), other dropout
masks and other validation seeds than the run left alone, and ends several points away from it.

The loggers are flushed as each checkpoint is written: a resumed run logs again only the steps
after its checkpoint (TensorBoard's purge_step hides the rest), so values logged before it must be
on disk, not in the writer's queue of a process killed with SIGKILL (its epoch's train/loss_epoch
went missing from a resumed sweep job's curves).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import _set_rng_states

from finetune.run import rng_states

log = logging.getLogger("finetune")


class ResumeState(L.Callback):
    """Saves torch (CPU and CUDA), numpy and Python RNG states with each checkpoint; restores them
    when training starts from one.

    Restored at `on_train_start`, after Lightning has built and restored the train loader, and
    before the first batch: in the run left alone nothing draws from these RNGs between the
    checkpoint and the next batch either. Under DDP rank zero's states are saved and every rank
    gets them back, as `seed_everything` seeds every rank alike.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states.collect(include_cuda=True)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:  # TensorBoard's save() flushes its event writer
            logger.save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = rng_states.as_numpy_state(state_dict["rng"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore, None
        cuda = states.get("torch.cuda")
        if cuda is not None and len(cuda) != (torch.cuda.device_count() if torch.cuda.is_available() else 0):
            log.warning("resume: the checkpoint holds %d CUDA RNG states for %d visible devices; "
                        "CUDA RNGs start fresh", len(cuda), torch.cuda.device_count())
            states.pop("torch.cuda")
        _set_rng_states(states)
