"""The validation split taken off train is stored with the run and reused on resume: no image
moves between train and val, whatever happened to the folder in between."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import finetune.cli.train
from fake_data import make_cifar10, patch_cifar10
from finetune.cli.train import train
from finetune.data.cifar10 import CIFAR10DataModule
from finetune.data.shapes import write_image_folder
from finetune.errors import FinetuneError

SMALL = ["model.weights=null", "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null",
         "data.num_workers=0", "data.image_size=32", "data.resize_size=32", "data.batch_size=16",
         "trainer.precision=32-true", "test=false", "logger=csv", "data.val_fraction=0.25"]


def _names(subset) -> list[str]:
    source = subset.dataset
    return [Path(os.path.relpath(source.samples[i][0], source.root)).as_posix() for i in subset.indices]


def test_a_resumed_run_validates_on_its_stored_files_whatever_changed_in_train(make_cfg, tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "data", {"train": 8, "test": 2}, size=32)  # 32 train files
    built = []
    real_build = finetune.cli.train.build
    monkeypatch.setattr(finetune.cli.train, "build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    common = ["data=folder", f"data.root={root}", *SMALL]
    train(make_cfg([*common, "trainer.max_epochs=1"]))
    datasets = built[-1][0].datasets
    first_train, first_val = _names(datasets["train"]), _names(datasets["val"])
    assert json.loads((tmp_path / "val_split.json").read_text())["val"] == first_val

    # Before the resume: one validation file and two training files go, two new files come.
    (root / "train" / first_val[0]).unlink()
    for name in first_train[:2]:
        (root / "train" / name).unlink()
    for i, name in enumerate(("circle/new.png", "square/new.png")):
        shutil.copy(root / "test" / name.split("/")[0] / f"000{i}.png", root / "train" / name)
    resumed = tmp_path / "resumed.ckpt"
    (tmp_path / "checkpoints" / "last.ckpt").rename(resumed)
    train(make_cfg([*common, "trainer.max_epochs=2"]), ckpt_path=resumed)
    datasets = built[-1][0].datasets
    second_train, second_val = _names(datasets["train"]), _names(datasets["val"])
    assert second_val == first_val[1:]  # the same files, less the one that is gone
    assert not set(second_train) & set(first_val)  # nothing validated before is trained on now
    assert {"circle/new.png", "square/new.png"} <= set(second_train)


def test_sources_read_by_index_reuse_their_indices_and_refuse_a_changed_listing(tmp_path, monkeypatch):
    def datamodule(per_batch: int, **kwargs) -> CIFAR10DataModule:
        patch_cifar10(monkeypatch, make_cifar10(tmp_path / str(per_batch), per_batch=per_batch))
        return CIFAR10DataModule(root=str(tmp_path / str(per_batch)), download=False, num_workers=0, **kwargs)

    first = datamodule(20)
    first.setup("fit")
    state = first.state_dict()
    assert state["val_split"]["val_indices"] == first.datasets["val"].indices

    again = datamodule(20)
    again.load_state_dict(state)
    again.setup("fit")
    assert again.datasets["val"].indices == first.datasets["val"].indices
    assert again.datasets["train"].indices == first.datasets["train"].indices

    other_fraction = datamodule(20, val_fraction=0.2)
    other_fraction.load_state_dict(state)
    with pytest.raises(FinetuneError, match="data.val_fraction=0.2 differs"):
        other_fraction.setup("fit")

    grown = datamodule(21)  # 105 training images instead of 100: every index means another image
    grown.load_state_dict(state)
    with pytest.raises(FinetuneError, match="training data changed since this run split"):
        grown.setup("fit")
