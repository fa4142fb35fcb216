"""`data=cifar10`: torchvision's CIFAR-10, downloaded with its MD5 check or read from `data.root`."""

from __future__ import annotations

import urllib.error
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from finetune.data.datamodule import ImageDataModule
from finetune.errors import FinetuneError

# Known before download, so the model's head can be sized without touching the network.
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (50,000 train / 10,000 test, 32x32); val is a seeded slice of train."""

    def __init__(self, root: str, download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.download = download

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    def prepare_data(self) -> None:
        try:
            for train in (True, False):
                CIFAR10(str(self.root), train=train, download=self.download)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise FinetuneError(
                f"could not download CIFAR-10 ({getattr(e, 'reason', e)}); put "
                f"cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ in {self.root} "
                "(data.root=DIR), or run `python -m finetune.prefetch data=cifar10` with internet"
            ) from None
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise FinetuneError(
                f"no valid CIFAR-10 under data.root={self.root} ({e}); set data.download=true "
                "or point data.root at the folder holding cifar-10-batches-py/"
            ) from None

    def source_size(self) -> int:
        return 32

    def make_split(self, split: str, transform) -> Dataset | None:
        if split == "val":
            return None
        return CIFAR10(str(self.root), train=split == "train", transform=transform)
