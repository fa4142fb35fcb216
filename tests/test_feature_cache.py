"""The frozen-feature cache is keyed by the whole path from file to feature.

A tiny source (16-pixel images fed at 32 or 48) takes the per-batch path: each image goes through
the per-image transform at its own size, and `on_after_batch_transfer` upsamples and normalises
the batch. Everything in that second step, the precision and the memory format must change the
key, or a run silently trains its head on another run's features.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from conftest import compose_train
from finetune.cli.train import build, train
from finetune.data.preprocessing import decide_for
from finetune.data.shapes import write_image_folder
from finetune.finetuning import FeatureCache

SIZE = 32  # crop size of the base run: twice the 16-pixel source, so batches are upsampled


def tiny_run(root: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [
        "data=folder", f"data.root={root}", f"data.image_size={SIZE}", f"data.resize_size={SIZE}",
        "data.batch_size=16", "data.num_workers=0", "model.weights=null", "callbacks=model_checkpoint",
        "logger=csv", "+trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
        "finetune=frozen", "data.augment=false", "trainer.precision=32-true", "trainer.max_epochs=2",
        "model.optimizer.lr=0.01", f"finetune.callback.cache_dir={cache_dir}", *overrides,
    ]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """4 classes of 16-pixel PNGs: 12 train and 4 test images per class."""
    return write_image_folder(tmp_path_factory.mktemp("tiny"), {"train": 12, "test": 4}, size=16)


@pytest.fixture(scope="module")
def base_cache(tiny_folder, tmp_path_factory) -> Path:
    """The cache left by one run of the base config."""
    work = tmp_path_factory.mktemp("base")
    train(compose_train(tiny_run(tiny_folder, work / "cache"), work / "run"))
    assert sorted(p.name.split("-")[0] for p in (work / "cache").glob("*.pt")) == ["train", "val"]
    return work / "cache"


def test_the_tiny_source_takes_the_per_batch_upsampling_path(tiny_folder, tmp_path):
    dm, _, _ = build(compose_train(tiny_run(tiny_folder, tmp_path / "cache"), tmp_path))
    dm.setup("fit")
    image, _ = dm.datasets["train"][0]
    assert dm.batch_transform is not None and image.shape[-1] == 16
    assert dm.on_after_batch_transfer((image[None], None), 0)[0].shape[-1] == SIZE


@pytest.mark.parametrize("change", [
    [],  # same config: the cache is reused and the result is the cold run's
    [f"data.image_size={SIZE + 16}", f"data.resize_size={SIZE + 16}"],  # per-batch resize size
    ["data.mean=[0.5,0.5,0.5]"],  # per-batch normalisation
    ["trainer.precision=bf16-mixed"],  # autocast dtype
], ids=["same", "image_size", "mean", "precision"])
@pytest.mark.slow  # warm and cold trainings per case
def test_a_changed_config_recomputes_the_features_and_matches_a_cold_cache(
    change, tiny_folder, base_cache, tmp_path
):
    shared = tmp_path / "shared"
    shutil.copytree(base_cache, shared)
    warm = train(compose_train(tiny_run(tiny_folder, shared, *change), tmp_path / "warm"))
    written = len(list(shared.glob("*.pt"))) - 2
    assert written == (2 if change else 0)  # a new train and val entry, or none

    cold = train(compose_train(tiny_run(tiny_folder, tmp_path / "empty", *change), tmp_path / "cold"))
    assert warm["test/acc"] == cold["test/acc"]
    assert warm["test/loss"] == pytest.approx(cold["test/loss"], rel=1e-6)
    assert warm["val/loss"] == pytest.approx(cold["val/loss"], rel=1e-6)


def test_every_step_from_file_to_feature_is_in_the_key(tiny_folder, tmp_path):
    """One change at a time to what `key_parts` sees; each must give a new file name."""
    cfg = compose_train(tiny_run(tiny_folder, tmp_path / "cache"), tmp_path)
    dm, model, trainer = build(cfg)
    trainer.strategy.connect(model)
    dm.setup("fit")

    def path(**kwargs) -> Path:
        options = {"name": "resnet18", "channels_last": False, **kwargs}
        return FeatureCache(model.backbone, trainer, str(tmp_path / "cache"), **options).path_for(dm, "train")

    base = path()
    assert base == path(), "the key must be stable"
    assert path(channels_last=True) != base
    assert path(name="timm:resnet18") != base
    for change in [{"crop_size": 40, "resize_size": 40}, {"mean": (0.5, 0.5, 0.5)},
                   {"std": (0.3, 0.3, 0.3)}, {"interpolation": "bicubic"}]:
        kept = dict(dm.overrides)
        dm.overrides.update(change)
        decide_for(dm, model.preprocessing)
        dm.setup("fit")
        assert dm.batch_transform is not None and path() != base, change
        dm.overrides = kept
        decide_for(dm, model.preprocessing)
        dm.setup("fit")
    assert path() == base
    with torch.no_grad():
        next(iter(model.backbone.parameters())).add_(1.0)
    assert path() != base, "the backbone's tensors"


def test_a_path_that_cannot_be_described_is_not_cached_and_says_so(tiny_folder, tmp_path, caplog):
    """A lambda is named only by its address, which differs in every process: no key, no entry."""
    dm, model, trainer = build(compose_train(tiny_run(tiny_folder, tmp_path / "cache"), tmp_path))
    trainer.strategy.connect(model)
    dm.setup("fit")
    folder = dm.datasets["train"].dataset
    folder.transform = v2.Compose([v2.Lambda(lambda image: image), folder.transform])
    cache = FeatureCache(model.backbone, trainer, str(tmp_path / "cache"))
    assert cache.path_for(dm, "train") is None
    with caplog.at_level(logging.WARNING, logger="finetune"):
        features = cache.features(dm, "train")
    assert len(features) == len(dm.datasets["train"])
    assert not list((tmp_path / "cache").glob("*.pt"))
    assert "feature cache: not kept for train" in caplog.text and "memory address" in caplog.text
