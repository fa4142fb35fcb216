"""Every config composes, and every experiment runs end to end with fast_dev_run, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_data import make_cifar10, make_hotdog_tree, patch_cifar10
from finetune.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group", ["data", "model", "trainer", "callbacks", "logger", "finetune",
                                   "debug", "experiment"])
def test_every_option_composes(make_cfg, group, shapes_folder):
    for option in options(group):
        cfg = make_cfg([f"{group}={option}", f"++data.root={shapes_folder}"])
        assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_, option


def test_each_group_has_its_options():
    assert {"shapes", "folder", "hotdog", "cifar10"} <= set(options("data"))
    assert {f"resnet{n}" for n in (18, 34, 50, 101, 152)} <= set(options("model"))
    assert {"full", "frozen", "gradual"} <= set(options("finetune"))
    assert {"cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"quickstart", "imagefolder_resnet50", "cifar10_resnet18", "hotdog_frozen",
            "hotdog_d2l", "hotdog_d2l_scratch"} <= set(options("experiment"))


FAST = ["debug=fast", "model.weights=null", "data.image_size=32", "data.resize_size=32",
        "data.batch_size=4", "callbacks.rich_progress_bar=null"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_with_fast_dev_run(make_cfg, experiment, shapes_folder, tmp_path, monkeypatch):
    cfg = make_cfg([f"experiment={experiment}", *FAST])
    if cfg.data._target_.endswith("FolderDataModule"):
        cfg.data.root = str(shapes_folder)
    if cfg.data._target_.endswith("HotdogDataModule"):
        make_hotdog_tree(Path(cfg.data.root))
    if cfg.data._target_.endswith("CIFAR10DataModule"):
        patch_cifar10(monkeypatch, make_cifar10(Path(cfg.data.root)))
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["train/loss_epoch"] > 0
