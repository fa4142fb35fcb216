"""Small stand-ins for the downloadable data sets, in their real on-disk formats."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np

from finetune.data.shapes import write_image_folder


def make_hotdog_tree(data_dir: Path, per_class: int = 4) -> Path:
    """data_dir/hotdog/{train,test}/{hotdog,not-hotdog}/ as the d2l zip extracts."""
    tmp = data_dir / ".shapes"
    write_image_folder(tmp, {"train": per_class, "test": per_class}, size=32)
    for split in ("train", "test"):
        for src, cls in (("circle", "hotdog"), ("square", "not-hotdog")):
            dest = data_dir / "hotdog" / split / cls
            dest.parent.mkdir(parents=True, exist_ok=True)
            (tmp / split / src).rename(dest)
    return data_dir / "hotdog"


def make_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict:
    """A tiny CIFAR-10 in torchvision's python format; returns the class attributes to patch.

    torchvision checks each file's MD5 against constants, so tests patch those constants to the
    generated files' sums (see `patch_cifar10`).
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"]}, f)

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    return {
        "train_list": [[n, md5(n)] for n in names[:5]],
        "test_list": [["test_batch", md5("test_batch")]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5("batches.meta")},
    }


def make_cifar10_archive(dest: Path, work: Path) -> dict:
    """cifar-10-python.tar.gz as torchvision downloads it; returns attributes to patch (with tgz_md5)."""
    attrs = make_cifar10(work)
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(work / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    attrs["tgz_md5"] = hashlib.md5(dest.read_bytes()).hexdigest()
    return attrs


def patch_cifar10(monkeypatch, attrs: dict) -> None:
    from torchvision.datasets import CIFAR10

    for key, value in attrs.items():
        monkeypatch.setattr(CIFAR10, key, value)
