"""`data=cifar10`: torchvision's CIFAR-10, downloaded with its MD5 check or read from `data.root`."""

from __future__ import annotations

import urllib.error
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from finetune.data.datamodule import ImageDataModule
from finetune.errors import FinetuneError
from finetune.run.cache_lock import entry_lock

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
            self._check_or_fetch()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise FinetuneError(
                f"could not download CIFAR-10 ({getattr(e, 'reason', e)}); put "
                f"cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ in {self.root} "
                "(data.root=DIR), or run `python -m finetune.cli.prefetch data=cifar10` with internet"
            ) from None
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise FinetuneError(
                f"no valid CIFAR-10 under data.root={self.root} ({e}); set data.download=true "
                "or point data.root at the folder holding cifar-10-batches-py/"
            ) from None

    def _check_or_fetch(self) -> None:
        """Use the files if they check out; else fetch them under a lock, so that jobs of a sweep
        download and extract once (and a read-only `data.root` that holds them is never written).

        torchvision writes the archive and the extracted files in place, but checks the MD5 of
        every file (train and test) whenever a CIFAR10 is made: a file a killed job left half
        written is never trusted; it is downloaded or extracted again.
        """
        try:
            CIFAR10(str(self.root), train=True)
            return
        except RuntimeError:
            if not self.download:
                raise
        with entry_lock(self.root / "cifar-10-batches-py"):
            CIFAR10(str(self.root), train=True, download=True)

    def source_size(self) -> int:
        return 32

    def make_split(self, split: str, transform) -> Dataset | None:
        if split == "val":
            return None
        return CIFAR10(str(self.root), train=split == "train", transform=transform)
