"""Data modules: splits, transforms from the weights, CIFAR-10's real download path on loopback."""

from __future__ import annotations

import pytest
import torch

from fake_data import make_cifar10_archive, patch_cifar10
from finetune.data import CIFAR10DataModule, FolderDataModule, ShapesDataModule
from finetune.data.preprocessing import decide_for
from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError


def test_val_is_a_seeded_slice_of_train_when_the_folder_has_none(shapes_folder):
    dm = FolderDataModule(root=str(shapes_folder), num_workers=0, val_fraction=0.25, seed=3,
                          image_size=16, resize_size=16)
    dm.setup()
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 4 * 24
    assert len(dm.datasets["val"]) == 24
    assert set(dm.datasets["val"].indices).isdisjoint(dm.datasets["train"].indices)
    again = FolderDataModule(root=str(shapes_folder), num_workers=0, val_fraction=0.25, seed=3)
    again.setup()
    assert again.datasets["val"].indices == dm.datasets["val"].indices


def test_an_explicit_val_folder_is_used(shapes_folder, tmp_path):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(shapes_folder, root)
    shutil.copytree(root / "test", root / "val")
    dm = FolderDataModule(root=str(root), num_workers=0)
    dm.setup()
    assert len(dm.datasets["val"]) == 4 * 8 and len(dm.datasets["train"]) == 4 * 24


def test_preprocessing_from_the_model_with_data_overrides_on_top():
    dm = ShapesDataModule(image_size=40, num_workers=0)
    model_p = Preprocessing(crop_size=224, resize_size=232, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    p = decide_for(dm, model_p)
    assert (p.crop_size, p.resize_size, p.mean) == (40, round(40 * 232 / 224), (0.5, 0.5, 0.5))
    dm.setup()
    image, _ = dm.datasets["test"][0]
    assert image.shape == (3, 40, 40)


def _test_batch(on_device: bool, model_p: Preprocessing, **stats) -> torch.Tensor:
    """The first test batch as the model sees it (after the per-batch step, if any)."""
    dm = ShapesDataModule(image_size=40, resize_size=40, native_size=16, test_size=8, batch_size=8,
                          num_workers=0, resize_on_device=on_device, **stats)
    decide_for(dm, model_p)
    dm.setup()
    assert (dm.batch_transform is not None) == on_device  # the path under test
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    return batch[0]


@pytest.mark.parametrize("on_device", [False, True], ids=["per-image", "per-batch-upsampled"])
def test_the_configured_mean_and_std_are_the_ones_applied(on_device):
    """Against the same pixels with mean 0, std 1: (x - mean) / std per channel, exactly, whether
    normalisation happens per image or on the batch (sources at most half the crop size)."""
    model_p = Preprocessing(crop_size=224, resize_size=232, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    raw = _test_batch(on_device, model_p, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert raw.shape == (8, 3, 40, 40)
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0 and float(raw.std()) > 0.1  # pixels/255

    mean, std = (0.1, 0.5, 0.9), (0.5, 0.25, 0.125)
    configured = _test_batch(on_device, model_p, mean=mean, std=std)
    expected = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(configured, expected, rtol=1e-5, atol=1e-5)
    # Left unset, the data takes the model's (the pretrained weights') statistics.
    torch.testing.assert_close(_test_batch(on_device, model_p), (raw - 0.5) / 0.2, rtol=1e-5, atol=1e-5)


def test_cifar10_downloads_with_its_checksum_from_a_local_server(http_server, tmp_path, monkeypatch):
    www, base = http_server
    attrs = make_cifar10_archive(www / "cifar-10-python.tar.gz", tmp_path / "work")
    patch_cifar10(monkeypatch, {**attrs, "url": f"{base}/cifar-10-python.tar.gz"})
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), num_workers=0, image_size=32, resize_size=32)
    assert dm.num_classes == 10
    dm.prepare_data()
    dm.setup()
    assert len(dm.datasets["test"]) == 20 and len(dm.datasets["train"]) + len(dm.datasets["val"]) == 100
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape[1:] == (3, 32, 32) and labels.dtype == torch.int64

    # A corrupted archive fails its MD5 check.
    monkeypatch.setattr("torchvision.datasets.CIFAR10.tgz_md5", "0" * 32)
    broken = CIFAR10DataModule(root=str(tmp_path / "other"), num_workers=0)
    with pytest.raises(FinetuneError, match="CIFAR-10"):
        broken.prepare_data()


def test_cifar10_offline_without_a_copy_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.CIFAR10.url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(FinetuneError, match="could not download CIFAR-10"):
        dm.prepare_data()
