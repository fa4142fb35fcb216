"""Fine-tuning strategies: what trains, what stays bitwise frozen, and at which learning rate."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from finetune.cli.train import build, train
from finetune.data.preprocessing import decide_for
from finetune.data.shapes import write_image_folder
from finetune.data.transforms import eval_transform
from finetune.finetuning import FeatureCache

TINY = [
    "data=shapes", "data.train_size=96", "data.val_size=32", "data.test_size=32",
    "data.image_size=32", "data.resize_size=32", "data.batch_size=16",
    "model.weights=null", "callbacks.rich_progress_bar=null", "logger=csv",
    "+trainer.enable_model_summary=false",
]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


class Snapshots(L.Callback):
    """Backbone state at the end of every training epoch, and the optimizer's groups."""

    def __init__(self) -> None:
        self.backbone: list[dict] = []
        self.groups: list[list[tuple[str, float]]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.backbone.append(snapshot(pl_module.backbone))
        self.groups.append([(g.get("name"), g["lr"]) for g in trainer.optimizers[0].param_groups])


class LoaderData(L.Callback):
    """What the training loader reads (the images, or a strategy's stand-in such as cached features)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.train = trainer.train_dataloader.dataset


def test_frozen_keeps_every_backbone_tensor_bitwise(make_cfg):
    cfg = make_cfg(TINY + ["finetune=frozen", "trainer.max_epochs=2"])
    dm, model, trainer = build(cfg)
    backbone, head = snapshot(model.backbone), snapshot(model.head)
    trainer.fit(model, datamodule=dm)
    assert changed(backbone, snapshot(model.backbone)) == []  # weights and BN running stats
    assert any(k.endswith("running_mean") for k in backbone)
    assert sorted(changed(head, snapshot(model.head))) == ["1.bias", "1.weight"]
    # Every group exists from the start; the frozen backbone's parameters get no gradient.
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["backbone", "backbone.no_decay", "head",
                                                                       "head.no_decay"]
    assert not any(p.requires_grad for p in model.backbone.parameters())


class BatchNormModes(L.Callback):
    """Per training epoch: the set of `training` flags of the backbone's BatchNorm layers, seen at
    every training step (after Lightning's validation restored the modules' modes)."""

    def __init__(self) -> None:
        self.epochs: dict[int, set[bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        flags = {m.training for m in pl_module.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        self.epochs.setdefault(trainer.current_epoch, set()).update(flags)


@pytest.mark.parametrize("strategy, expected", [
    (["finetune=frozen", "finetune.callback.feature_cache=false"], {0: {False}, 1: {False}}),
    (["finetune=gradual", "finetune.callback.unfreeze_at_epoch=1"], {0: {False}, 1: {True}}),
])
@pytest.mark.slow  # trains twice
def test_frozen_batchnorm_normalises_with_running_statistics_while_training(make_cfg, strategy, expected):
    """Otherwise training would see batch statistics and evaluation the running ones."""
    dm, model, trainer = build(make_cfg(TINY + strategy + ["trainer.max_epochs=2", "+trainer.num_sanity_val_steps=1"]))
    modes = BatchNormModes()
    trainer.callbacks.append(modes)
    trainer.fit(model, datamodule=dm)
    assert modes.epochs == expected


@pytest.mark.slow  # multi-epoch training
def test_gradual_unfreezes_at_the_configured_epoch(make_cfg):
    cfg = make_cfg(TINY + [
        "finetune=gradual", "finetune.callback.unfreeze_at_epoch=1",
        "finetune.callback.backbone_lr_mult=0.1", "trainer.max_epochs=2",
        "model.optimizer.lr=0.01",
    ])
    dm, model, trainer = build(cfg)
    spy = Snapshots()
    trainer.callbacks.append(spy)
    start = snapshot(model.backbone)
    trainer.fit(model, datamodule=dm)
    assert changed(start, spy.backbone[0]) == []
    assert len(changed(spy.backbone[0], spy.backbone[1])) > 10
    # The backbone's groups are there from the start, at 0.1x; only what trains changes.
    groups = [("backbone", pytest.approx(0.001)), ("backbone.no_decay", pytest.approx(0.001)),
              ("head", 0.01), ("head.no_decay", 0.01)]
    assert spy.groups == [groups, groups]


@pytest.mark.slow  # end-to-end training
def test_head_lr_mult_and_layer_decay_set_group_learning_rates(make_cfg):
    cfg = make_cfg(TINY + ["finetune=full", "model.head_lr_mult=10", "model.optimizer.lr=5e-5"])
    _, model, _ = build(cfg)
    groups = {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}
    assert groups == {"backbone": pytest.approx(5e-5), "backbone.no_decay": pytest.approx(5e-5),
                      "head": pytest.approx(5e-4), "head.no_decay": pytest.approx(5e-4)}

    cfg = make_cfg(TINY + ["finetune=full", "model.layer_decay=0.5", "model.optimizer.lr=1e-3"])
    _, model, _ = build(cfg)
    lrs = {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}
    # As in timm: the head is the top layer; resnet18 has a stem and 8 blocks below it.
    assert lrs["head"] == pytest.approx(1e-3)
    assert lrs["backbone.layer4.1"] == pytest.approx(5e-4)
    assert lrs["backbone.layer4.0"] == pytest.approx(2.5e-4)
    assert lrs["backbone.layer3.1.no_decay"] == pytest.approx(1.25e-4)
    assert lrs["backbone.stem"] == pytest.approx(1e-3 * 0.5 ** 9)


@pytest.mark.slow  # end-to-end training
def test_cached_features_give_the_same_logits_and_follow_the_transform(make_cfg, tmp_path):
    cfg = make_cfg(TINY + ["finetune=frozen", "data.augment=false", "trainer.precision=32-true"])
    dm, model, trainer = build(cfg)
    trainer.strategy.connect(model)
    dm.setup("fit")
    model.eval()
    images, _ = next(iter(DataLoader(dm.datasets["train"], batch_size=8)))

    cache = FeatureCache(model.backbone, trainer, str(tmp_path / "cache"))
    features = cache.features(dm, "train")
    model.takes_features = True  # as finetune=frozen says while the head trains on them
    with torch.no_grad():
        assert torch.allclose(model(features.tensors[0][:8]), model(images), atol=1e-5)
    first = cache.path_for(dm, "train")
    assert first.exists()

    # Same transform: the file is reused. New transform: a new key, so a rebuild.
    again = FeatureCache(model.backbone, trainer, str(tmp_path / "cache")).features(dm, "train")
    assert torch.equal(again.tensors[0], features.tensors[0])
    dm.overrides["crop_size"] = dm.overrides["resize_size"] = 24
    decide_for(dm, model.preprocessing)
    dm.setup("fit")
    second = cache.path_for(dm, "train")
    assert second != first
    rebuilt = cache.features(dm, "train")
    assert second.exists() and rebuilt.tensors[0].shape == features.tensors[0].shape


@pytest.mark.slow  # end-to-end training
def test_frozen_training_uses_the_cache_when_the_transform_is_deterministic(make_cfg):
    cfg = make_cfg(TINY + ["finetune=frozen", "data.augment=false", "trainer.max_epochs=2"])
    dm, model, trainer = build(cfg)
    loaded = LoaderData()
    trainer.callbacks.append(loaded)
    trainer.fit(model, datamodule=dm)
    assert isinstance(loaded.train, torch.utils.data.TensorDataset)
    cached = sorted(p.name.split("-")[0] for p in (Path(cfg.paths.data_dir) / "feature_cache").glob("*.pt"))
    assert cached == ["train", "val"]
    # Test still runs the whole network on images.
    trainer.test(model, datamodule=dm)
    assert 0.0 <= trainer.callback_metrics["test/acc"] <= 1.0


@pytest.mark.slow  # end-to-end training
def test_feature_cache_sees_batches_resized_on_the_device(make_cfg, tmp_path):
    """Tiny sources are upsampled per batch in `on_after_batch_transfer`; the cache must do it too,
    and its features must be those of the same images resized one by one."""
    root = write_image_folder(tmp_path / "tiny", {"train": 8, "test": 2}, size=16)
    cfg = make_cfg(["data=folder", f"data.root={root}", "data.image_size=48", "data.resize_size=48",
                    "data.batch_size=8", "model.weights=null", "callbacks=none", "logger=csv",
                    "+trainer.enable_model_summary=false", "finetune=frozen", "data.augment=false",
                    "trainer.precision=32-true", "trainer.max_epochs=1"])
    dm, model, trainer = build(cfg)
    dm.setup("fit")
    native = dm.datasets["train"]
    assert dm.batch_transform is not None and native[0][0].shape[-2:] == (16, 16)  # upsampled x3
    folder = native.dataset
    per_image = Subset(ImageFolder(folder.root, eval_transform(dm.preprocessing), loader=folder.loader),
                       native.indices)
    loaded = LoaderData()
    trainer.callbacks.append(loaded)
    trainer.fit(model, datamodule=dm)

    cached = loaded.train.tensors[0]
    images = torch.stack([image for image, _ in per_image])
    assert images.shape[-2:] == (48, 48)
    model.eval()
    with torch.no_grad():
        expected = model.backbone(images)
    # On the CPU the batch path uses torch's Pillow-equivalent uint8 kernel: ~1e-6 apart (float
    # rounding, memory format); without the upsampling they are ~0.7 apart.
    assert (cached - expected).norm() / expected.norm() < 1e-4


@pytest.mark.slow  # multi-epoch training, then a resume
def test_gradual_resumed_after_the_unfreeze_keeps_training_the_backbone(make_cfg, tmp_path):
    run = TINY + ["finetune=gradual", "finetune.callback.unfreeze_at_epoch=1", "test=false",
                  "callbacks=default", "callbacks.rich_progress_bar=null", "model.optimizer.lr=0.01"]
    last = tmp_path / "checkpoints" / "last.ckpt"
    train(make_cfg(run + ["trainer.max_epochs=2"]))  # epoch 1 trained the backbone
    before = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    dm, model, trainer = build(make_cfg(run + ["trainer.max_epochs=3"]))
    modes = BatchNormModes()
    trainer.callbacks.append(modes)
    trainer.fit(model, datamodule=dm, ckpt_path=str(last), weights_only=False)
    after = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    backbone = [k for k in before if k.startswith("backbone.") and k.endswith("weight")]
    assert len([k for k in backbone if not torch.equal(before[k], after[k])]) > 10
    assert modes.epochs == {2: {True}}  # as in an uninterrupted run after the unfreeze
