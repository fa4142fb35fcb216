"""Every config composes, and every experiment runs end to end with fast_dev_run, offline."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig

import finetune.cli.train
from fake_data import make_cifar10, make_hotdog_tree, patch_cifar10
from finetune.cli.train import train
from finetune.data.shapes import CLASSES as SHAPES

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


# Backbone output width per architecture: the experiment's model, not a default, was built.
FEATURES = {"resnet18": 512, "resnet50": 2048, "tf_efficientnet_lite0": 1280}
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def prepare_data(cfg: DictConfig, shapes_folder: Path, monkeypatch) -> list[str]:
    """Put the experiment's data set in place (generated, offline); returns its class names."""
    target = cfg.data._target_
    if target.endswith("FolderDataModule"):
        cfg.data.root = str(shapes_folder)
        return sorted(p.name for p in (shapes_folder / "train").iterdir())
    if target.endswith("HotdogDataModule"):
        tree = make_hotdog_tree(Path(cfg.data.root))
        return sorted(p.name for p in (tree / "train").iterdir())
    if target.endswith("CIFAR10DataModule"):
        patch_cifar10(monkeypatch, make_cifar10(Path(cfg.data.root)))
        return CIFAR10
    assert target.endswith("ShapesDataModule"), target
    return list(SHAPES)


def lr_by_parameter(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """Each parameter's starting rate (a scheduler keeps it as `initial_lr`)."""
    return {id(p): group.get("initial_lr", group["lr"]) for group in optimizer.param_groups
            for p in group["params"]}


def check_optimizer(cfg: DictConfig, model, trainer) -> None:
    """The experiment's optimizer class and settings, its head rate and its scheduler are in use."""
    (optimizer,) = trainer.optimizers
    settings = cfg.model.optimizer
    assert type(optimizer) is hydra.utils.get_class(settings._target_)
    for key, value in settings.items():
        if key.startswith("_") or key == "lr":
            continue
        values = {group[key] for group in optimizer.param_groups}
        # Decay may be left off biases and norm weights (their groups say 0), never changed.
        assert values in ({value}, {value, 0.0}) if key == "weight_decay" else values == {value}, key
    lr = lr_by_parameter(optimizer)
    head = [lr[id(p)] for p in model.head.parameters()]
    assert head == pytest.approx([settings.lr * cfg.model.head_lr_mult] * len(head))
    backbone = [lr[id(p)] for p in model.backbone.parameters() if p.requires_grad]
    if cfg.finetune.name == "full" and not cfg.model.get("layer_decay"):
        assert backbone and backbone == pytest.approx([settings.lr] * len(backbone))
    scheduler = cfg.model.get("scheduler")
    configs = trainer.lr_scheduler_configs
    if scheduler is None:
        assert not configs
    else:
        (config,) = configs
        assert type(config.scheduler) is hydra.utils.get_class(scheduler._target_)
        for key, value in scheduler.items():
            if not key.startswith("_"):
                assert getattr(config.scheduler, key) == value, key


def check_what_trained(cfg: DictConfig, model, before: dict[str, torch.Tensor]) -> None:
    """One optimizer step happened: the head moved; the backbone moved unless frozen."""
    after = model.state_dict()
    changed = {k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])}
    assert any(k.startswith("head.") for k in changed), "the head did not train"
    backbone_changed = any(k.startswith("backbone.") for k in changed)
    if cfg.finetune.name == "frozen":
        assert not any(p.requires_grad for p in model.backbone.parameters()), "finetune=frozen did not freeze"
        assert not backbone_changed, sorted(changed)[:5]  # BatchNorm statistics included
    elif cfg.finetune.name == "full":
        assert backbone_changed, "finetune=full left the backbone as it was"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_with_fast_dev_run(make_cfg, experiment, shapes_folder, tmp_path, monkeypatch):
    """One batch each of train, val and test; what ran is what the experiment says."""
    cfg = make_cfg([f"experiment={experiment}", *FAST])
    classes = prepare_data(cfg, shapes_folder, monkeypatch)
    built = {}

    def recording_build(*args, **kwargs):  # the real build; keeps its parts and the weights before fit
        _, built["model"], built["trainer"] = parts = real_build(*args, **kwargs)
        built["before"] = copy.deepcopy(parts[1].state_dict())
        return parts

    real_build = finetune.cli.train.build
    monkeypatch.setattr(finetune.cli.train, "build", recording_build)
    metrics = train(cfg)
    model, trainer = built["model"], built["trainer"]

    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] >= 0
    assert metrics["last_epoch/train/loss_epoch"] > 0
    assert metrics["test/images"] == cfg.data.batch_size  # fast_dev_run: exactly one test batch
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    # The head is sized to the data, and the classes are the data's, in the data's order.
    assert model.class_names == classes and model.head[-1].out_features == len(classes)
    assert model.head[-1].in_features == FEATURES[cfg.model.name]
    assert model.preprocessing.crop_size == 32
    if cfg.data.get("augment") is not None:
        assert model.preprocessing.augment == cfg.data.augment
    check_optimizer(cfg, model, trainer)
    check_what_trained(cfg, model, built["before"])
