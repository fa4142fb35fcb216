"""`PredictionGrid`: watch the model learn, one captioned grid of validation images per epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from finetune.callbacks.grid import batch_logits, captioned_grid, displayable, tensorboard


def class_name(names: list[str] | None, index: int) -> str:
    return names[index] if names and 0 <= index < len(names) else str(index)


class PredictionGrid(L.Callback):
    """Logs the first `max_images` validation images with predicted and true labels.

    The same images every epoch (validation is not shuffled), so the TensorBoard slider shows the
    predictions change; wrong ones are framed red. Only these images are kept, and one grid is
    written per logged epoch, so the cost and the event file stay small whatever the data size.
    """

    def __init__(self, max_images: int = 16, every_n_epochs: int = 1, tile_size: int = 112,
                 tag: str = "val/predictions") -> None:
        self.max_images = max_images
        self.every_n_epochs = max(1, every_n_epochs)
        self.tile_size = tile_size
        self.tag = tag
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _wanted(self, trainer: L.Trainer) -> bool:
        return (
            not trainer.sanity_checking
            and trainer.current_epoch % self.every_n_epochs == 0
            and tensorboard(trainer) is not None
            and sum(len(k[0]) for k in self._kept) < self.max_images
        )

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0 or not self._wanted(trainer):
            return
        images, targets = batch[0], batch[1]
        if images.dim() != 4:  # cached features, not images: nothing to show
            return
        take = self.max_images - sum(len(k[0]) for k in self._kept)
        probs = batch_logits(pl_module, outputs, images)[:take].float().softmax(dim=-1)
        self._kept.append((displayable(images[:take], pl_module), targets[:take].cpu(), probs.cpu()))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        kept, self._kept = self._kept, []
        writer = tensorboard(trainer)
        if not kept or writer is None:
            return
        images, targets, probs = (torch.cat(parts) for parts in zip(*kept))
        confidence, predicted = probs.max(dim=-1)
        names = getattr(pl_module, "class_names", None)
        captions = [
            f"{class_name(names, p)} {c:.2f}\ntrue: {class_name(names, t)}"
            for p, c, t in zip(predicted.tolist(), confidence.tolist(), targets.tolist())
        ]
        wrong = (predicted != targets).tolist()
        grid = captioned_grid(images, captions, wrong, self.tile_size)
        writer.add_image(self.tag, grid, global_step=trainer.global_step)
