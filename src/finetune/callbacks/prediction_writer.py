"""`PredictionWriter`: stream top-k predictions to a CSV as batches finish, so memory stays flat
however many images are predicted."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from finetune.data.file_walk import printable


class PredictionWriter(BasePredictionWriter):
    """Writes `path, label, probability, label_2, probability_2, ...` (top `top_k`) followed by
    one `prob_<class>` column per class, one row per image; batches come from
    `ImageFiles.collate`, so unreadable files arrive as (path, reason) and are collected in
    `skipped`. `counts` and the first `keep_rows` rows are kept for the summary."""

    def __init__(self, output: str | Path, top_k: int = 3, keep_rows: int = 10) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.top_k = top_k
        self.keep_rows = keep_rows
        self.rows: list[list[Any]] = []
        self.written = 0
        self.counts: Counter[str] = Counter()
        self.skipped: list[tuple[str, str]] = []
        self._file = None
        self._csv = None
        self._names: list[str] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._names = list(pl_module.class_names)
        self.top_k = max(1, min(self.top_k, len(self._names)))
        header = ["path", "label", "probability"]
        for rank in range(2, self.top_k + 1):
            header += [f"label_{rank}", f"probability_{rank}"]
        header += [f"prob_{name}" for name in self._names]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.output, "w", newline="", encoding="utf-8")  # noqa: SIM115 - open across batches
        self._csv = csv.writer(self._file)
        self._csv.writerow(header)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        _, paths, skipped = batch
        self.skipped.extend((printable(path), reason) for path, reason in skipped)
        probs: torch.Tensor = prediction.float().cpu()
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        for path, row_p, ps, idx in zip(paths, probs.tolist(), top_p.tolist(), top_i.tolist()):
            row: list[Any] = [printable(path)]  # a non-UTF-8 name escaped recoverably
            for p, i in zip(ps, idx):
                row += [self._names[i], f"{p:.6f}"]
            row += [f"{p:.6f}" for p in row_p]
            self._csv.writerow(row)
            self.counts[self._names[idx[0]]] += 1
            self.written += 1
            if len(self.rows) < self.keep_rows:
                self.rows.append(row[: 1 + 2 * self.top_k])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_predict_end(trainer, pl_module)
