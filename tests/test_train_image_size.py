"""`data.train_image_size`: train at one crop size, evaluate at another (FixRes).

Training batches must reach the network at the train size and val/test batches at the eval size,
whether images are resized one by one or (tiny sources) upsampled per batch on the device; the
frozen-feature cache must compute and key each split's features with the step its uncached path
uses; the checkpoint records the train size and evaluation keeps the eval size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import compose_train
from finetune.cli.train import build, train
from finetune.data.shapes import write_image_folder
from finetune.data.transforms import Preprocessing, eval_pipeline
from finetune.errors import FinetuneError
from finetune.finetuning import FeatureCache
from finetune.models.checkpoint import load_classifier

EVAL = 48


class BatchSizes(L.Callback):
    """The (height, width) of every batch the model receives, per stage."""

    def __init__(self) -> None:
        self.train: set[tuple[int, int]] = set()
        self.val: set[tuple[int, int]] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.add(tuple(batch[0].shape[-2:]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.add(tuple(batch[0].shape[-2:]))


def run(root: Path, *overrides: str) -> list[str]:
    return ["data=folder", f"data.root={root}", f"data.image_size={EVAL}", f"data.resize_size={EVAL}",
            "data.batch_size=8", "data.num_workers=0", "model.weights=null", "callbacks=none", "logger=csv",
            "+trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
            "trainer.precision=32-true", "trainer.max_epochs=1", *overrides]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """16-pixel images: at crop 48 they are upsampled per batch on the device."""
    return write_image_folder(tmp_path_factory.mktemp("tiny16"), {"train": 8, "test": 2}, size=16)


@pytest.fixture(scope="module")
def normal_folder(tmp_path_factory) -> Path:
    """40-pixel images: at crop 48 they are resized one by one."""
    return write_image_folder(tmp_path_factory.mktemp("normal40"), {"train": 8, "test": 2}, size=40)


@pytest.mark.parametrize("source", ["normal", "tiny"])
def test_training_batches_arrive_at_the_train_size_and_val_batches_at_the_eval_size(
        source, tiny_folder, normal_folder, tmp_path):
    root = tiny_folder if source == "tiny" else normal_folder
    dm, model, trainer = build(compose_train(run(root, "finetune=full", "data.train_image_size=32"), tmp_path))
    dm.setup("fit")
    assert (dm.batch_transform is not None) == (source == "tiny")  # the path under test
    sizes = BatchSizes()
    trainer.callbacks.append(sizes)
    trainer.fit(model, datamodule=dm)
    assert sizes.train == {(32, 32)}
    assert sizes.val == {(EVAL, EVAL)}
    assert model.preprocessing.crop_size == EVAL and model.preprocessing.train_crop_size == 32


@pytest.mark.parametrize("source", ["normal", "tiny"])
def test_the_train_features_are_keyed_by_the_train_size_and_val_and_lp_ft_views_are_not(
        source, tiny_folder, normal_folder, tmp_path):
    """Frozen backbone, deterministic training data: the train split's features change with the
    train size (and so must its key); val's, and LP-FT's view of the training images through the
    eval transform, do not (and share their entries with a run without a train size)."""
    root = tiny_folder if source == "tiny" else normal_folder

    def paths(*overrides: str) -> dict[str, Path]:
        L.seed_everything(0)  # the same random-init backbone in both builds
        dm, model, trainer = build(compose_train(run(root, "finetune=frozen", "data.augment=false", *overrides),
                                                 tmp_path))
        trainer.strategy.connect(model)
        dm.setup("fit")
        cache = FeatureCache(model.backbone, trainer, str(tmp_path / "cache"), name="resnet18")
        out = {split: cache.path_for(dm, split) for split in ("train", "val")}
        out["view"] = cache.path_for(dm, "train", dm.train_eval_view())
        return out

    same, other = paths(), paths("data.train_image_size=32")
    assert same["train"] == same["view"]  # no train size: training already sees the eval view
    assert other["train"] != same["train"]
    assert other["val"] == same["val"]
    assert other["view"] == same["view"]


def test_lp_ft_stage_one_trains_on_eval_size_features_of_the_training_images(tiny_folder, tmp_path):
    """With a train size, the view of the training images through the eval transform is at the eval
    size, and the cache computes its features with the eval size's per-batch step."""
    dm, model, trainer = build(compose_train(
        run(tiny_folder, "finetune=lp_ft", "data.augment=false", "data.train_image_size=32"), tmp_path))
    trainer.strategy.connect(model)
    dm.setup("fit")
    view = dm.train_eval_view()
    native = torch.stack([image for image, _ in view])
    assert dm.batch_step_for(view) is dm.batch_transform
    assert dm.batch_step_for(dm.datasets["train"]) is dm.train_batch_transform
    model.eval()
    with torch.no_grad():
        expected = model.backbone(dm.batch_transform(native))
    cached = FeatureCache(model.backbone, trainer, None).features(dm, "train", view).tensors[0]
    assert (cached - expected).norm() / expected.norm() < 1e-4


@pytest.mark.slow  # two trainings
def test_cached_and_uncached_frozen_training_agree_with_a_train_size(tiny_folder, tmp_path):
    """The frozen strategy's cache must train the head on what the uncached path feeds it."""
    results = []
    for cache in ("true", "false"):
        results.append(train(compose_train(
            run(tiny_folder, "finetune=frozen", "data.augment=false", "data.train_image_size=32",
                f"finetune.callback.feature_cache={cache}", "finetune.callback.cache_dir=null",
                "trainer.max_epochs=2", "model.optimizer.lr=0.01", "callbacks=model_checkpoint"),
            tmp_path / cache)))
    assert results[0]["test/loss"] == pytest.approx(results[1]["test/loss"], rel=1e-4)


def test_the_checkpoint_records_the_train_size_and_evaluation_uses_the_eval_size(normal_folder, tmp_path):
    train(compose_train(run(normal_folder, "finetune=full", "data.train_image_size=32", "test=false",
                            "callbacks=model_checkpoint"), tmp_path))
    model = load_classifier(tmp_path / "checkpoints" / "last.ckpt")
    p = model.preprocessing
    assert (p.crop_size, p.train_crop_size) == (EVAL, 32)
    assert eval_pipeline(p, 40).side == EVAL
    # A checkpoint written before the field existed: the same size for training and eval.
    old = {k: v for k, v in p.as_dict().items() if k != "train_crop_size"}
    assert Preprocessing.from_dict(old).train_crop_size is None


def test_a_train_size_the_backbone_cannot_take_is_one_line(normal_folder, tmp_path):
    """A ViT's fixed patch grid takes only its own size; 0 is no size at all."""
    with pytest.raises(FinetuneError, match=r"^data.train_image_size=32 is not an input size this backbone"):
        build(compose_train(run(normal_folder, "model.name=timm:vit_tiny_patch16_224", "data.image_size=224",
                                "data.resize_size=256", "data.train_image_size=32"), tmp_path))
    with pytest.raises(FinetuneError, match=r"^data.train_image_size=0 is out of range"):
        train(compose_train(run(normal_folder, "data.train_image_size=0"), tmp_path))


def test_a_train_size_above_the_decoded_size_is_said_out_loud(normal_folder, caplog):
    """JPEGs are draft-decoded (and `data.cache` copies shrunk) to the eval sizes: a larger train
    crop is upsampled from them."""
    from finetune.data import FolderDataModule
    with caplog.at_level(logging.WARNING, logger="finetune"):
        FolderDataModule(root=str(normal_folder), image_size=32, resize_size=36, num_workers=0).setup()
        assert "train_image_size" not in caplog.text
        FolderDataModule(root=str(normal_folder), image_size=32, resize_size=36, train_image_size=40,
                         num_workers=0).setup()
    assert "data.train_image_size=40 is above the eval sizes" in caplog.text and "resize_size >= 40" in caplog.text
