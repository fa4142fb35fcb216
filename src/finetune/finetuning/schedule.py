"""A learning-rate schedule that fits the fine-tuning steps actually run.

A constant rate for a few dozen steps is what starved stage 2 of LP-FT: BiT's HyperRule and
timm's recipes warm up linearly and then decay (cosine) to zero over the steps in which the
network trains. `WarmupCosine` does that from the step at which the backbone joins (LP-FT's stage
2, gradual's unfreeze; step 0 for `full` and the probe); before it, the head trains at its own
constant rate. The model hands it `total_steps` and `start_step` (`ImageClassifier.configure_optimizers`),
and a time budget may shorten `total_steps` mid-run (`finetune.callbacks.budget`): it is plain state,
saved in checkpoints with the scheduler's `state_dict`.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Constant until `start_step`, then linear warmup over `warmup_steps` (default:
    `warmup_fraction` of the fine-tuning steps), then cosine to zero at `total_steps`. Step it every
    optimizer step (`model.scheduler_interval=step`)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, start_step: int = 0,
                 warmup_steps: int | None = None, warmup_fraction: float = 0.1, last_epoch: int = -1) -> None:
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={warmup_fraction} must lie in [0, 1)")
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        super().__init__(optimizer, last_epoch)

    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return round(self.warmup_fraction * max(0, self.total_steps - self.start_step))

    def factor(self, step: int) -> float:
        """The multiple of each group's base rate at optimizer step `step` (0-based)."""
        if step < self.start_step:
            return 1.0
        done, warmup = step - self.start_step, self.warmup()
        if done < warmup:
            return (done + 1) / (warmup + 1)
        span = max(1, self.total_steps - self.start_step - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - warmup) / span)))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
