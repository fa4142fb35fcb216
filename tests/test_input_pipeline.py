"""Input pipeline: reduced-size JPEG decode, the shrunk on-disk copy, batch upsampling of tiny sources."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.cli.train import train
from finetune.data import FolderDataModule
from finetune.data.folder import load_rgb
from finetune.data.resized_cache import resized_copy
from finetune.data.transforms import eval_transform
from finetune.data.workers import default_num_workers


def photo(path, size=(500, 375), seed=0):
    """A smooth colour gradient with a little noise, saved as a JPEG."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    pixels = (pixels + rng.normal(0, 5, pixels.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_jpeg_is_decoded_at_reduced_size_but_never_below_the_target(tmp_path):
    path = photo(tmp_path / "p.jpg")
    small = load_rgb(str(path), min_side=112)
    assert small.size == (250, 188)  # 1/2 scale; 1/4 (125x94) would go below 112
    assert load_rgb(str(path), min_side=300).size == (500, 375)
    assert load_rgb(str(path)).size == (500, 375)
    full = load_rgb(str(path)).resize((149, 112), Image.Resampling.BILINEAR)
    drafted = small.resize((149, 112), Image.Resampling.BILINEAR)
    diff = np.abs(np.asarray(full, dtype=float) - np.asarray(drafted, dtype=float)).mean()
    assert diff < 3, diff


def test_shrunk_copy_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                photo(root / split / cls / f"{i}.jpg", size=(120, 90), seed=i)
    (root / "train" / "a" / "small.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (20, 30)).save(root / "train" / "a" / "small.png")
    cache = tmp_path / "cache"

    first = resized_copy(root, cache, short_side=45)
    with Image.open(first / "train" / "b" / "2.jpg") as im:
        assert im.size == (60, 45)
    with Image.open(first / "train" / "a" / "small.png") as im:  # already small: copied as is
        assert im.size == (20, 30)
    assert resized_copy(root, cache, short_side=45) == first

    photo(root / "train" / "b" / "2.jpg", size=(200, 90), seed=9)
    second = resized_copy(root, cache, short_side=45)
    assert second != first and not first.exists()
    with Image.open(second / "train" / "b" / "2.jpg") as im:
        assert im.size == (100, 45)
    assert resized_copy(root, cache, short_side=30) != second


def test_tiny_sources_are_upsampled_per_batch(shapes_folder):
    dm = FolderDataModule(root=str(shapes_folder), image_size=96, resize_size=110, num_workers=0, batch_size=8)
    dm.setup()
    assert dm.batch_transform is not None  # 32-pixel images at crop 96
    images, targets = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[-2:] == (32, 32)
    images, targets = dm.on_after_batch_transfer((images, targets), 0)
    assert images.dtype == torch.float32 and images.shape == (8, 3, 96, 96)

    # Eval: the same picture as Pillow's resize-then-center-crop, within interpolation differences.
    raw, _ = dm.datasets["test"][0]
    on_device = dm.on_after_batch_transfer((raw[None], None), 0)[0][0]
    path = dm.datasets["test"].samples[0][0]
    reference = eval_transform(dm.preprocessing)(Image.open(path).convert("RGB"))
    assert on_device.shape == reference.shape
    assert (on_device - reference).abs().mean() < 0.15

    per_image = FolderDataModule(root=str(shapes_folder), image_size=96, num_workers=0, resize_on_device=False)
    per_image.setup()
    assert per_image.batch_transform is None
    assert per_image.datasets["train"][0][0].shape == (3, 96, 96)


def test_loader_settings_come_from_the_machine_and_can_be_overridden(shapes_folder):
    dm = FolderDataModule(root=str(shapes_folder))
    assert dm.num_workers == default_num_workers()
    assert dm.pin_memory == torch.cuda.is_available()
    dm = FolderDataModule(root=str(shapes_folder), num_workers=1, pin_memory=False, prefetch_factor=4)
    dm.setup()
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.prefetch_factor) == (1, False, 4)


def test_tiny_sources_trained_on_the_cpu_load_in_the_main_process(shapes_folder):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    tiny = FolderDataModule(root=str(shapes_folder), image_size=96)  # 32-pixel images at crop 96
    tiny.trainer = trainer
    tiny.setup()
    assert tiny.batch_transform is not None and tiny.train_dataloader().num_workers == 0
    given = FolderDataModule(root=str(shapes_folder), image_size=96, num_workers=1)
    given.trainer = trainer
    given.setup()
    assert given.train_dataloader().num_workers == 1
    full_size = FolderDataModule(root=str(shapes_folder), image_size=32, resize_size=32)
    full_size.trainer = trainer
    full_size.setup()
    assert full_size.batch_transform is None
    assert full_size.train_dataloader().num_workers == default_num_workers()


@pytest.mark.parametrize("overrides", [
    ["data.image_size=64", "data.resize_size=64"],                      # 32-pixel images fed at 64
    ["data.image_size=16", "data.resize_size=16", "data.cache=true"],  # a shrunk copy at 16
])
def test_training_through_each_pipeline(make_cfg, shapes_folder, tmp_path, overrides):
    cfg = make_cfg([
        "data=folder", f"data.root={shapes_folder}", "data.num_workers=0", "model.weights=null",
        "trainer.max_epochs=1", "logger=csv", "callbacks=none", "+trainer.enable_progress_bar=false",
        *overrides,
    ])
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and np.isfinite(metrics["last_epoch/train/loss_epoch"])
    cached = list((tmp_path / "data" / "cache").glob(f"{shapes_folder.name}-*-16px-*"))
    assert bool(cached) == ("data.cache=true" in overrides)
