"""`ConfusionMatrix`: which classes the model confuses, after every test run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassRecall,
)

from finetune.callbacks.grid import batch_logits, tensorboard


def class_names_of(pl_module: L.LightningModule) -> list[str]:
    names = getattr(pl_module, "class_names", None)
    if names:
        return list(names)
    return [str(i) for i in range(int(pl_module.hparams["num_classes"]))]


def confusion_figure(matrix: torch.Tensor, class_names: list[str], annotate_up_to: int = 20) -> Figure:
    """torchmetrics' own plot, on a pyplot-free Figure so no GUI backend is ever involved."""
    n = len(class_names)
    side = min(20.0, max(4.0, 0.45 * n + 2.5))
    figure = Figure(figsize=(side, side), dpi=100)
    ax = figure.add_subplot()
    MulticlassConfusionMatrix(n).plot(matrix, ax=ax, add_text=n <= annotate_up_to, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(matrix.sum())
    accuracy = float(matrix.diagonal().sum()) / max(1, total)
    ax.set_title(f"accuracy {accuracy:.3f} on {total} images")
    figure.tight_layout()
    return figure


def render(figure: Figure):
    """The figure as an (H, W, 4) uint8 array, drawn once for both TensorBoard and the PNG."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


class ConfusionMatrix(L.Callback):
    """Accumulates test predictions; at the end of the test epoch logs the confusion-matrix figure
    and per-class accuracy (recall) to the loggers, and with `save_dir` also writes
    confusion_matrix.csv/.png and per_class.csv (precision, recall, support) there.

    The numbers stay on the callback (`matrix`, `precision`, `recall`, `class_names`) for the
    eval entry point to print.
    """

    def __init__(self, save_dir: str | None = None, tag: str = "test/confusion_matrix",
                 annotate_up_to: int = 20) -> None:
        self.save_dir = Path(save_dir) if save_dir else None
        self.tag = tag
        self.annotate_up_to = annotate_up_to
        self.metrics: MetricCollection | None = None
        self.matrix: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None
        self.recall: torch.Tensor | None = None
        self.class_names: list[str] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.class_names = class_names_of(pl_module)
        n = len(self.class_names)
        self.metrics = MetricCollection({
            "matrix": MulticlassConfusionMatrix(n),
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
        }).to(pl_module.device)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.metrics is not None and dataloader_idx == 0:
            self.metrics.update(batch_logits(pl_module, outputs, batch[0]), batch[1])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.metrics is None or not self.metrics["matrix"].update_called:
            return
        values = {k: v.cpu() for k, v in self.metrics.compute().items()}  # synced across ranks
        self.metrics = None
        self.matrix, self.precision, self.recall = values["matrix"], values["precision"], values["recall"]
        if not trainer.is_global_zero:
            return
        per_class = {f"test/acc_per_class/{name}": float(r) for name, r in zip(self.class_names, self.recall)}
        for logger in trainer.loggers:
            logger.log_metrics(per_class, step=trainer.global_step)
        picture = render(confusion_figure(self.matrix, self.class_names, self.annotate_up_to))
        if self.save_dir is not None:
            self.save(self.save_dir, picture)
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_image(self.tag, picture[..., :3], global_step=trainer.global_step, dataformats="HWC")

    def save(self, folder: Path, picture) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / "confusion_matrix.png")
        with open(folder / "confusion_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *self.class_names])
            for name, row in zip(self.class_names, self.matrix.tolist()):
                writer.writerow([name, *row])
        with open(folder / "per_class.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "precision", "recall", "support"])
            support = self.matrix.sum(dim=1).tolist()
            for row in zip(self.class_names, self.precision.tolist(), self.recall.tolist(), support):
                writer.writerow([row[0], f"{row[1]:.4f}", f"{row[2]:.4f}", row[3]])
