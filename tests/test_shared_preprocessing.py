"""Eval, predict and export's input check read images through one preprocessing path: for tiny
sources (at most half the crop size) that is the native-size crop per image and the upsampling +
normalisation per batch on the device, not a per-image resize to the crop size."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import compose_train
from finetune.cli.export import check_batch
from finetune.cli.predict import predict
from finetune.cli.train import train
from finetune.data import FolderDataModule
from finetune.data.preprocessing import decide_for
from finetune.data.shapes import write_image_folder
from finetune.models.checkpoint import load_classifier


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a best checkpoint fed 64 px, resized to 73 then center-cropped, and the 32-px folder it
    was trained on)."""
    tmp = tmp_path_factory.mktemp("tiny_source")
    root = write_image_folder(tmp / "data", {"train": 8, "test": 3}, size=32)
    out = tmp / "run"
    train(compose_train(["data=folder", f"data.root={root}", "data.image_size=64",
                         "model.weights=null", "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=1",
                         "trainer.precision=32-true", "callbacks.rich_progress_bar=null",
                         "callbacks.prediction_grid=null", "logger=csv"], out_dir=out))
    (best,) = (out / "checkpoints").glob("epoch_*.ckpt")
    return best, root


def _eval_inputs(model, root: Path) -> tuple[list[str], torch.Tensor]:
    """The test images exactly as eval feeds them to the model: its data module's loader, then the
    per-batch step."""
    datamodule = FolderDataModule(root=str(root), num_workers=0, batch_size=4)
    model.set_preprocessing(decide_for(datamodule, model.preprocessing))
    datamodule.setup("test")
    assert datamodule.batch_transform is not None  # 32 px at 64: upsampled per batch
    images = [datamodule.on_after_batch_transfer(batch, 0)[0] for batch in datamodule.test_dataloader()]
    return [path for path, _ in datamodule.datasets["test"].samples], torch.cat(images)


def test_predict_gives_evals_probabilities_on_a_tiny_source(tiny_run, tmp_path):
    best, root = tiny_run
    model = load_classifier(best)
    paths, images = _eval_inputs(model, root)
    with torch.no_grad():
        expected = (model(images) / model.temperature).softmax(-1)
    predict(compose_train([f"ckpt_path={best}", f"input={root / 'test'}", "top_k=1"], tmp_path, config_name="predict"))
    with open(tmp_path / "predictions.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    got = torch.tensor([[float(rows[p][f"prob_{c}"]) for c in model.class_names] for p in paths])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_exports_input_check_reads_images_as_eval_does(tiny_run, tmp_path):
    best, root = tiny_run
    model = load_classifier(best)
    _, images = _eval_inputs(model, root)
    cfg = compose_train([f"ckpt_path={best}", f"check_input={root / 'test'}", "check_batch_size=5"], tmp_path,
                        config_name="export")
    checked = check_batch(cfg, model.preprocessing, torch.Generator().manual_seed(0))
    assert checked.shape == (5, 3, 64, 64)
    assert torch.allclose(checked, images[:5], atol=1e-6), (checked - images[:5]).abs().max()
