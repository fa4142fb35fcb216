"""Backbone features of a data set, computed batch by batch as training would see them.

`extract_features` keeps them in memory (no cache dir); `FeatureCache` hands `stream_features` a
`FeatureWriter`, which appends each batch to an `.npy` file so that only one batch is ever held in
the process, and reads the finished file back memory-mapped (`MappedFeatures`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from finetune.data.progress import Progress

if TYPE_CHECKING:
    from finetune.data.transforms import BatchResize


class FeatureSource(Protocol):
    """What the cache uses of a data module (`finetune.data.datamodule.ImageDataModule`'s data
    contract): a split's images, a loader that reads them in order, and the per-batch step that
    goes with their transform."""

    def images(self, split: str) -> Dataset: ...

    def ordered_loader(self, dataset: Dataset) -> DataLoader: ...

    def batch_step_for(self, dataset: Dataset) -> BatchResize | None: ...

    def resize_batch(self, batch: Any, step: BatchResize | None) -> Any: ...

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...  # named in the key


@torch.no_grad()
def stream_features(
    backbone: nn.Module, loader: DataLoader, trainer: L.Trainer, source: FeatureSource | None, channels_last: bool,
    sink: Callable[[torch.Tensor, torch.Tensor], None], what: str,
) -> None:
    """Each batch's backbone outputs (float32, CPU) and labels, in order, handed to `sink` as they come.

    Batches go through the source's per-batch step for the loader's data set (`batch_step_for`,
    what `on_after_batch_transfer` gives them in training or evaluation) and the precision plugin, and
    into the memory format the model's `forward` uses, as they would in training (small sources
    are resized and normalised on the device there).
    """
    modes = {m: m.training for m in backbone.modules()}  # per module: frozen BatchNorm is already eval
    backbone.eval()
    device = trainer.strategy.root_device
    step = source.batch_step_for(loader.dataset) if source is not None else None
    try:
        with Progress(what, total=len(loader.dataset)) as progress, trainer.precision_plugin.forward_context():
            for images, targets in loader:
                images = images.to(device)
                if source is not None:
                    images, targets = source.resize_batch((images, targets), step)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sink(backbone(images).float().cpu(), torch.as_tensor(targets))
                progress.advance(len(images))
    finally:
        for module, mode in modes.items():
            module.training = mode


def extract_features(
    backbone: nn.Module, loader: DataLoader, trainer: L.Trainer, source: FeatureSource | None = None,
    channels_last: bool = False, what: str = "extracting features",
) -> TensorDataset:
    """Backbone outputs for every sample of `loader`, in order, as float32 in memory (see `stream_features`).

    `FeatureCache` streams them to disk instead; this is for runs with no cache dir.
    """
    features, labels = [], []

    def keep(batch: torch.Tensor, targets: torch.Tensor) -> None:
        features.append(batch)
        labels.append(targets)

    stream_features(backbone, loader, trainer, source, channels_last, keep, what)
    return TensorDataset(torch.cat(features), torch.cat(labels))


class MappedFeatures(TensorDataset):
    """Features memory-mapped from an `.npy` file (read through the page cache, never loaded whole)
    and their labels (in memory: 8 bytes an image).

    Pickled (a loader worker under spawn) by its path, so a worker maps the file too rather than
    receiving a copy of every feature.
    """

    def __init__(self, path: str | Path, labels: torch.Tensor) -> None:
        self.path = Path(path)
        # Copy-on-write: a writable tensor (no warning from torch), and the file is never changed.
        features = torch.from_numpy(np.load(self.path, mmap_mode="c"))
        super().__init__(features, labels)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.tensors[1])


class FeatureWriter:
    """A `sink` for `stream_features` that appends each batch to an open `.npy` file of `n` rows.

    The header (shape `(n, *feature shape)`) is written with the first batch, which says the
    feature shape; the labels are kept in memory (8 bytes an image). Only one batch of features
    is ever held here.
    """

    def __init__(self, file: IO[bytes], n: int) -> None:
        self.file, self.n, self.rows = file, n, 0
        self.shape: tuple[int, ...] | None = None
        self.labels: torch.Tensor | None = None
        self.header_bytes = 0

    def __call__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        if self.shape is None:
            self.shape = (self.n, *features.shape[1:])
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": self.shape}
            np.lib.format.write_array_header_1_0(self.file, header)
            self.header_bytes = self.file.tell()
            self.labels = torch.empty(self.n, dtype=targets.dtype)
        if tuple(features.shape[1:]) != self.shape[1:] or self.rows + len(features) > self.n:
            raise RuntimeError(f"feature cache: a batch of {tuple(features.shape)} does not fit rows "
                               f"{self.rows}.. of {self.shape}")
        self.file.write(np.ascontiguousarray(features.numpy(), dtype=np.float32).data)
        self.file.flush()  # on disk (the page cache) now, not in this process
        self.labels[self.rows:self.rows + len(features)] = targets
        self.rows += len(features)
