"""`python predict.py ckpt_path=PATH input=FILE_OR_DIR`: top-k labels for every image found.

Model, class names and transforms come from the checkpoint alone. Results stream to
`predictions.csv` in the run dir; files that are not readable images are listed as skipped with
the reason (and in `skipped.csv`) instead of stopping the batch.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from finetune.callbacks import PredictionWriter
from finetune.cli.config_source import entry_point
from finetune.data.image_files import ImageFilesData, find_files, model_inputs
from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier
from finetune.output_errors import check_writable, writing
from finetune.runtime import resolve_speed_settings

log = logging.getLogger("finetune")


def summary(writer: PredictionWriter) -> Table:
    table = Table(title=f"{writer.written} predictions (first {len(writer.rows)}) -> {writer.output}")
    table.add_column("path")
    for rank in range(1, writer.top_k + 1):
        table.add_column(f"#{rank}")
    for row in writer.rows:
        table.add_row(row[0], *(f"{row[i]} {float(row[i + 1]):.3f}" for i in range(1, len(row), 2)))
    return table


def predict(cfg: DictConfig) -> PredictionWriter:
    """Predict every file under `cfg.input`; returns the writer (rows written, counts, skipped)."""
    output = Path(cfg.output)
    if output.exists():
        raise FinetuneError(f"output={output} exists; pass another output=PATH or move the file away")
    check_writable(output)  # before any work: a read-only or misspelt path is one line
    model = load_classifier(cfg.ckpt_path, trust=bool(cfg.get("trust_checkpoint")))
    model.set_tta(cfg.get("tta"))
    files = find_files(cfg.input)
    p = model.preprocessing
    dataset = model_inputs(files, p)  # decoded and transformed as eval reads them (tiny images included)
    inputs = ImageFilesData(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    log.info("predicting %d files with %s | preprocessing: %s | temperature: %.4g (probabilities are "
             "softmax(logits / temperature)) | tta: %s", len(files), cfg.ckpt_path, p, model.applied_temperature, model.tta)

    writer = PredictionWriter(output, top_k=cfg.top_k)
    speed = resolve_speed_settings(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[writer], logger=False, **speed.trainer_kwargs())
    with writing(output):  # a full disk mid-way: one line naming the file
        trainer.predict(model, datamodule=inputs, return_predictions=False)

    console = Console()
    console.print(summary(writer))
    counts = ", ".join(f"{name}: {n}" for name, n in writer.counts.most_common())
    console.print(f"predicted labels: {counts or 'none'}")
    if writer.skipped:
        skipped_csv = output.with_name("skipped.csv")
        with writing(skipped_csv), open(skipped_csv, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("path", "reason"), *writer.skipped])
        console.print(f"skipped {len(writer.skipped)} unreadable file(s) (listed in {skipped_csv}):")
        for path, reason in writer.skipped:
            print(f"  {path}: {reason}")
    return writer


main = entry_point('predict', predict)


if __name__ == "__main__":
    main()
