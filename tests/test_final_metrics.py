"""metrics.json and the final table: one checkpoint's validation beside its test, and the last
epoch's values under their own name (train() tests the best checkpoint, not the last weights)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from finetune.cli.train import train

SMALL = ["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.batch_size=16",
         "data.native_size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
         "model.weights=null", "finetune=frozen", "data.augment=false", "model.optimizer.lr=0.01",
         "trainer.precision=32-true", "logger=csv",
         "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null", "callbacks.top_losses=null",
         "callbacks.confusion_matrix=null"]


def _epoch_rows(run_dir) -> list[dict[str, float]]:
    """The CSV logger's validation rows, one per epoch, in order."""
    (path,) = run_dir.rglob("metrics.csv")
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc")]
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


def test_metrics_report_the_best_checkpoints_validation_and_label_the_last_epoch(make_cfg, tmp_path, capsys):
    # Best by `epoch`, lowest first: the tested checkpoint is epoch 0's, the run ends at epoch 1.
    metrics = train(make_cfg([*SMALL, "trainer.max_epochs=2", "callbacks.model_checkpoint.monitor=epoch",
                              "callbacks.model_checkpoint.mode=min"]))
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    first, last = _epoch_rows(tmp_path)
    best = torch.load(tmp_path / "checkpoints" / "epoch_000.ckpt", map_location="cpu", weights_only=False)
    # val/* are the tested checkpoint's: its own temperature, not the one fitted at the last epoch.
    assert metrics["val/temperature"] == pytest.approx(best["hyper_parameters"]["temperature"], rel=1e-6)
    for key in ("val/acc", "val/loss", "val/temperature", "val/ece", "val/ece_calibrated"):
        assert metrics[key] == pytest.approx(first[key], rel=1e-6), key
        assert metrics[f"last_epoch/{key}"] == pytest.approx(last[key], rel=1e-6), key
    assert metrics["val/temperature"] != pytest.approx(metrics["last_epoch/val/temperature"], rel=1e-6)
    assert "last_epoch/train/loss_epoch" in metrics and "train/loss_epoch" not in metrics
    assert metrics["val/acc_best"] == pytest.approx(max(first["val/acc"], last["val/acc"]))  # the run's
    assert "test/acc" in metrics
    out = " ".join(capsys.readouterr().out.split())  # rich wraps table titles to the table's width
    assert "best checkpoint epoch_000.ckpt: validation and test" in out and "last epoch (not tested)" in out
