"""A callback the benchmarks load into `train.py` runs: mean training step time from step W on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L


class RankZeroStepTimer(L.Callback):
    """Wall time of training steps `warmup`..end, written by rank zero to `out` as {"step_s": ...}."""

    def __init__(self, out: str, warmup: int = 3) -> None:
        self.out, self.warmup = Path(out), warmup
        self.start = self.end = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.steps += 1
            self.end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.steps:
            self.out.write_text(json.dumps({"step_s": (self.end - self.start) / self.steps, "steps": self.steps}))
