"""`TopLosses`: the test images the model gets most confidently wrong."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from finetune.callbacks.grid import batch_logits, captioned_grid, displayable, tensorboard
from finetune.callbacks.prediction_grid import class_name


class TopLosses(L.Callback):
    """Keeps the `k` highest-loss test images seen so far (only those, on the CPU) and logs them as
    one captioned grid after the test epoch: prediction and its probability, true label, loss.

    These are usually mislabelled images, ambiguous ones, or a class the model has not learned.
    With several devices each rank keeps its own top `k` and rank zero's are shown.
    """

    def __init__(self, k: int = 16, tile_size: int = 112, tag: str = "test/top_losses") -> None:
        self.k = k
        self.tile_size = tile_size
        self.tag = tag
        self._best: dict[str, torch.Tensor] | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._best = None

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, targets = batch[0], batch[1]
        if dataloader_idx != 0 or images.dim() != 4 or tensorboard(trainer) is None:
            return
        logits = batch_logits(pl_module, outputs, images).float()
        losses = F.cross_entropy(logits, targets, reduction="none")
        if self._best is not None and len(self._best["loss"]) >= self.k:
            keep = losses > self._best["loss"].min().to(losses.device)
            if not keep.any():
                return
        else:
            keep = torch.ones_like(losses, dtype=torch.bool)
        chosen = keep.nonzero().squeeze(1)
        chosen = chosen[losses[chosen].topk(min(self.k, len(chosen))).indices]
        new = {
            "loss": losses[chosen].cpu(),
            "probs": logits[chosen].softmax(dim=-1).cpu(),
            "target": targets[chosen].cpu(),
            "image": displayable(images[chosen], pl_module),
        }
        if self._best is not None:
            new = {key: torch.cat([self._best[key], value]) for key, value in new.items()}
        order = new["loss"].topk(min(self.k, len(new["loss"]))).indices
        self._best = {key: value[order] for key, value in new.items()}

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best, self._best = self._best, None
        writer = tensorboard(trainer)
        if best is None or writer is None:
            return
        names = getattr(pl_module, "class_names", None)
        confidence, predicted = best["probs"].max(dim=-1)
        captions = [
            f"{class_name(names, p)} {c:.2f} loss {loss:.2f}\ntrue: {class_name(names, t)}"
            for p, c, loss, t in zip(predicted.tolist(), confidence.tolist(), best["loss"].tolist(),
                                     best["target"].tolist())
        ]
        wrong = (predicted != best["target"]).tolist()
        grid = captioned_grid(best["image"], captions, wrong, self.tile_size)
        writer.add_image(self.tag, grid, global_step=trainer.global_step)
