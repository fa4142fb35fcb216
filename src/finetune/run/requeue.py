"""Save and requeue a SLURM batch job on the signal SLURM sends before a time limit or preemption.

Lightning's own auto-requeue (SLURMEnvironment(auto_requeue=True)) saves the checkpoint and
flushes the loggers inside the signal handler, i.e. at whatever line the main thread was on: a
signal that lands while TensorBoard's writer holds its lock deadlocks the job (seen here with a
scalar logged every step). This callback's handler only notes the signal; at the end of the next
training batch it raises Lightning's own SIGTERM flag, which Lightning acts on once that batch is
logged and counted (where the train loader's saved position is exact: stopping at the start of an
epoch, after Lightning fetched its first batch, made the resumed run skip that batch), and
`on_exception` saves `hpc_ckpt_<n>.ckpt` in the run dir and calls `scontrol requeue` from rank zero. The requeued job
runs in the same run dir (`finetune.run.resume.prepare_argv`) and continues from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

import lightning as L
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("finetune")


def slurm_job_id() -> str:
    """The id `scontrol requeue` takes: `<array job>_<task>` for array jobs."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class RequeueOnSignal(L.Callback):
    """On `requeue_signal` (SIGUSR1 or SIGTERM): stop at the next batch, save, requeue the job."""

    def __init__(self, requeue_signal: signal.Signals = signal.SIGUSR1) -> None:
        self.requeue_signal = requeue_signal
        self._previous = None
        self._requested = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed after Lightning's own SIGTERM handler, so it replaces it for SIGTERM too.
        self._previous = signal.signal(self.requeue_signal, self._note)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping after this training batch to save and requeue",
                 signal.Signals(signum).name)
        self._requested = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        requested = self._requested
        if trainer.world_size > 1:  # every rank stops at the same batch
            requested = bool(trainer.strategy.reduce_boolean_decision(requested, all=False))
        if requested:  # Lightning raises SIGTERMException once this batch is logged and counted
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = _CheckpointConnector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            job = slurm_job_id()
            result = subprocess.call(["scontrol", "requeue", job])
            if result == 0:
                log.info("saved %s and requeued SLURM job %s", path, job)
            else:
                log.warning("saved %s; `scontrol requeue %s` failed (exit %s)", path, job, result)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.requeue_signal, self._previous)
            self._previous = None
