"""Frozen-feature cache: run a frozen backbone over a split once, then train the head on the result.

With a frozen backbone and a deterministic transform, every epoch would recompute the same
features; this turns N epochs of backbone forwards into one. On disk the cache is keyed by the
backbone's tensors, the transform and the data set's contents, so changing any of them rebuilds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

log = logging.getLogger("finetune")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:20]


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """What the data set holds and how it is transformed; None when that cannot be told."""
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        return inner and _digest(inner, list(dataset.indices))
    transform = repr(getattr(dataset, "transform", None))
    if hasattr(dataset, "samples"):  # ImageFolder and friends
        stats = [(p, os.stat(p), y) for p, y in dataset.samples]
        files = [(p, st.st_size, st.st_mtime_ns, y) for p, st, y in stats]
        return _digest(transform, files)
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):  # CIFAR-10 style arrays
        return _digest(transform, dataset.data.tobytes(), list(dataset.targets))
    if hasattr(dataset, "fingerprint"):
        return _digest(transform, dataset.fingerprint())
    return None


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: DataLoader, trainer: L.Trainer, datamodule: Any = None
) -> TensorDataset:
    """Backbone outputs for every sample of `loader`, in order, as float32 on the CPU.

    Batches go through the datamodule's `on_after_batch_transfer`, as they would in training
    (small sources are resized and normalised on the device there).
    """
    modes = {m: m.training for m in backbone.modules()}  # per module: frozen BatchNorm is already eval
    backbone.eval()
    device = trainer.strategy.root_device
    features, labels = [], []
    try:
        with trainer.precision_plugin.forward_context():
            for images, targets in loader:
                images = images.to(device)
                if datamodule is not None:
                    images, targets = datamodule.on_after_batch_transfer((images, targets), 0)
                features.append(backbone(images).float().cpu())
                labels.append(torch.as_tensor(targets))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return TensorDataset(torch.cat(features), torch.cat(labels))


class FeatureCache:
    def __init__(self, backbone: nn.Module, trainer: L.Trainer, cache_dir: str | None = None) -> None:
        self.backbone = backbone
        self.trainer = trainer
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._backbone_key = module_fingerprint(backbone) if self.cache_dir else None

    def path_for(self, dataset: Dataset, split: str) -> Path | None:
        data_key = dataset_fingerprint(dataset) if self.cache_dir else None
        if data_key is None:
            return None
        return self.cache_dir / f"{split}-{_digest(self._backbone_key, data_key)}.pt"

    def features(self, datamodule: Any, split: str) -> TensorDataset:
        dataset = datamodule.datasets[split]
        path = self.path_for(dataset, split)
        if path is not None and path.exists():
            features, labels = torch.load(path, weights_only=True)
            log.info("feature cache: %s features of %d images from %s", split, len(labels), path)
            return TensorDataset(features, labels)
        loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False,
                            num_workers=datamodule.loader_workers())
        result = extract_features(self.backbone, loader, self.trainer, datamodule)
        log.info("feature cache: computed %s features of %d images", split, len(result))
        if path is not None and self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(tuple(result.tensors), tmp)
            os.replace(tmp, path)
        return result
