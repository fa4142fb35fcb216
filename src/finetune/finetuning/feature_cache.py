"""Frozen-feature cache: run a frozen backbone over a split once, then train the head on the result.

With a frozen backbone and a deterministic transform, every epoch would recompute the same
features; this turns N epochs of backbone forwards into one. A cached feature is only right if
everything that produced it is the same, so the key covers the whole path from file to feature:

    data        the files (path, size, mtime, label), arrays or generator, and the subset indices
    per image   the decoder (loader) and the transform, as text
    per batch   the datamodule's `on_after_batch_transfer` and the `BatchResize` (size, mean, std,
                interpolation) that goes with the split's per-image transform (`batch_step_for`:
                training's at `data.train_image_size`, evaluation's otherwise), which tiny sources
                go through on the device
    numerics    the precision plugin (autocast dtype), the device type and the memory format
    backbone    its name, its module tree and every tensor of its state dict

Anything that cannot be described the same way in every process (a lambda in a transform, a data
set with no fingerprint) means no cache for that run, said in the log: a miss costs time, a wrong
hit costs the result.

An entry is two files: `SPLIT-KEY.npy`, the features (float32, one row per image), and `SPLIT-KEY.pt`,
the key and the labels. Features stream to a temp `.npy` one batch at a time as they are computed
(a million images through resnet50 are 8 GB of features: they must not sit in memory) and are read
back memory-mapped, so training reads them through the page cache. The temp file is renamed into
place only when every row is in, and the `.pt` is written after it: a run killed part way leaves
no `.pt`, so nothing is ever read from a half-written entry, and the next run for that key
deletes the leftover temp file. Without a cache dir the features are computed into memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from finetune.data.subsets import innermost
from finetune.finetuning.feature_extraction import (
    FeatureSource,
    FeatureWriter,
    MappedFeatures,
    extract_features,
    stream_features,
)

log = logging.getLogger("finetune")
FORMAT = 4  # bump when what an entry holds, how its key is made, or what the decoder does changes
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:20]


def describe(obj: Any) -> str:
    """`obj` as text that is the same in every process.

    A function's repr holds its memory address, so functions and classes are named by module
    and qualified name, partials by their function and arguments, and objects with a
    `describe()` method (BatchResize) by what it says; the rest by repr.
    """
    own = getattr(obj, "describe", None)
    if callable(own) and not isinstance(obj, type):
        text = own()
        if isinstance(text, str):
            return text
    if isinstance(obj, functools.partial):
        args = [describe(a) for a in obj.args] + [f"{k}={describe(v)}" for k, v in sorted(obj.keywords.items())]
        return f"{describe(obj.func)}({', '.join(args)})"
    if isinstance(obj, types.MethodType):  # the instance's state matters too
        return f"{describe(obj.__self__)}.{obj.__func__.__name__}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type)) and "<" not in obj.__qualname__:
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
        return repr(obj)  # a lambda or local function: its name says too little; its repr (address) no key
    functions = _lambda_functions(obj)
    return repr(obj) + "".join(f" with {describe(f)}" for f in functions)


def _lambda_functions(transform: Any) -> list[Any]:
    """The functions inside (v2.)Lambda transforms, nested in Compose & co: their repr names a
    lambda only `<lambda>`, so two different ones would share a key."""
    found = [transform.lambd] if callable(getattr(transform, "lambd", None)) else []
    inner = getattr(transform, "transforms", None)
    for t in inner if isinstance(inner, (list, tuple)) else ():
        found += _lambda_functions(t)
    return found


def module_fingerprint(module: nn.Module) -> str:
    """Every tensor of the state dict: name, dtype, shape and bytes (not its memory format)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """What the data set holds (not how it is transformed); None when that cannot be told."""
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        return inner and _digest(inner, list(dataset.indices))
    kind = f"{type(dataset).__module__}.{type(dataset).__qualname__}"
    if hasattr(dataset, "fingerprint"):
        return _digest(kind, dataset.fingerprint())
    if hasattr(dataset, "samples"):  # ImageFolder and friends
        stats = [(p, os.stat(p), y) for p, y in dataset.samples]
        return _digest(kind, [(p, st.st_size, st.st_mtime_ns, y) for p, st, y in stats])
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):  # CIFAR-10 style arrays
        return _digest(kind, dataset.data.tobytes(), list(dataset.targets))
    return None


def precision_description(trainer: L.Trainer) -> str:
    """The precision plugin (which autocast dtype, if any) and the device type it runs on."""
    plugin = trainer.precision_plugin
    precision = getattr(plugin, "precision", "?")
    return f"{type(plugin).__qualname__}({precision}) on {trainer.strategy.root_device.type}"


class FeatureCache:
    """Backbone features of a datamodule's splits, kept under `cache_dir` (None: computed, never kept).

    `name` (the backbone's, e.g. model.name) and `channels_last` (the model's input memory
    format) are part of the key, as are the trainer's precision and the datamodule's transforms.
    """

    def __init__(
        self, backbone: nn.Module, trainer: L.Trainer, cache_dir: str | None = None, *,
        name: str | None = None, channels_last: bool = False,
    ) -> None:
        self.backbone = backbone
        self.trainer = trainer
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.name = name
        self.channels_last = channels_last

    @functools.cached_property
    def _backbone_key(self) -> str:
        return module_fingerprint(self.backbone)

    def key_parts(self, source: FeatureSource, split: str,
                  images: Dataset | None = None) -> tuple[dict[str, str] | None, str]:
        """(everything a feature of `split` depends on, as text; "") or (None, why not); `images`:
        what its features are computed from (None: `source.images(split)`)."""
        dataset = source.images(split) if images is None else images
        data = dataset_fingerprint(dataset)
        if data is None:
            return None, (f"the {type(innermost(dataset)).__name__} data set has no fingerprint() "
                          "(nor samples, nor data and targets)")
        base = innermost(dataset)
        hook = type(source).on_after_batch_transfer
        parts = {
            "format": str(FORMAT),
            "split": split,
            "data": data,
            "per_image": f"loader={describe(getattr(base, 'loader', None))} "
                         f"transform={describe(getattr(base, 'transform', None))} "
                         f"target_transform={describe(getattr(base, 'target_transform', None))}",
            "per_batch": f"{describe(hook)}: {describe(source.batch_step_for(dataset))}",
            "precision": precision_description(self.trainer),
            "memory_format": "channels_last" if self.channels_last else "contiguous",
            "backbone": f"{self.name} {type(self.backbone).__qualname__} "
                        f"modules={_digest(repr(self.backbone))} tensors={self._backbone_key}",
        }
        unstable = [k for k, v in parts.items() if _ADDRESS.search(v)]
        if unstable or _ADDRESS.search(repr(self.backbone)):
            return None, f"the {', '.join(unstable) or 'backbone'} description holds a memory address: {parts}"
        return parts, ""

    def path_for(self, source: FeatureSource, split: str, images: Dataset | None = None) -> Path | None:
        """Where `split`'s features are kept; None when there is no cache dir or no key."""
        if self.cache_dir is None:
            return None
        parts, _ = self.key_parts(source, split, images)
        return None if parts is None else self.cache_dir / f"{split}-{_digest(json.dumps(parts, sort_keys=True))}.pt"

    def features(self, source: FeatureSource, split: str, images: Dataset | None = None) -> TensorDataset:
        """`split`'s features: from the cache when its key matches, else computed (and kept).
        `images`: what they are computed from (None: `source.images(split)`; LP-FT passes the
        training images through the evaluation transform)."""
        images = source.images(split) if images is None else images
        if self.cache_dir is None:
            return self._compute(source, split, images)
        parts, why = self.key_parts(source, split, images)
        if parts is None:
            log.warning("feature cache: not kept for %s: %s", split, why)
            return self._compute(source, split, images)
        path = self.cache_dir / f"{split}-{_digest(json.dumps(parts, sort_keys=True))}.pt"
        if not self.trainer.is_global_zero:  # only rank zero writes; the others read or compute
            return self._load(path, parts, len(images), split) or self._compute(source, split, images)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Concurrent runs (a sweep) wait for the one computing this entry, then read it.
        with FileLock(f"{path}.lock"):
            cached = self._load(path, parts, len(images), split)
            if cached is not None:
                return cached
            return self._compute_and_save(path, parts, source, split, images)

    def _compute(self, source: FeatureSource, split: str, images: Dataset) -> TensorDataset:
        """`split`'s features in memory (no cache dir, no key, or a rank that does not write)."""
        result = extract_features(self.backbone, source.ordered_loader(images), self.trainer, source,
                                  self.channels_last, what=f"extracting {split} features")
        log.info("feature cache: computed %s features of %d images (in memory)", split, len(result))
        return result

    @staticmethod
    def _features_path(path: Path) -> Path:
        return path.with_suffix(".npy")

    def _load(self, path: Path, parts: dict[str, str], n: int, split: str) -> TensorDataset | None:
        """The entry at `path` if it exists and was made from exactly `parts`, for as many images,
        with a features file of the shape and size it recorded."""
        if not path.exists():
            return None
        entry = torch.load(path, weights_only=True)
        features = self._features_path(path)
        if not isinstance(entry, dict) or entry.get("key") != parts or len(entry.get("labels", ())) != n \
                or not features.exists() or features.stat().st_size != entry.get("features_bytes"):
            log.warning("feature cache: %s does not match its key; computing %s features again", path, split)
            return None
        try:
            result = MappedFeatures(features, entry["labels"])
        except (ValueError, OSError) as error:  # not an .npy, or shorter than its header says
            log.warning("feature cache: %s cannot be read (%s); computing %s features again", features, error, split)
            return None
        if tuple(result.tensors[0].shape) != tuple(entry.get("shape", ())):
            log.warning("feature cache: %s does not match its key; computing %s features again", path, split)
            return None
        log.info("feature cache: %s features of %d images from %s (memory-mapped)", split, n, features)
        return result

    def _compute_and_save(self, path: Path, parts: dict[str, str], source: FeatureSource, split: str,
                          images: Dataset) -> TensorDataset:
        """Features streamed to a temp `.npy` next to `path` batch by batch, renamed into place when
        complete, then the `.pt` (key and labels) the same way: an entry is whole or absent.

        Called under the entry's lock, so temp files of this entry are leftovers of a killed run.
        """
        for stale in path.parent.glob(f".{path.stem}.*.tmp"):
            log.info("feature cache: removing %s, left by a run stopped while writing it", stale)
            stale.unlink(missing_ok=True)
        features = self._features_path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{features.name}.", suffix=".tmp")
        n = len(images)
        try:
            with os.fdopen(fd, "wb") as file:
                writer = FeatureWriter(file, n)
                stream_features(self.backbone, source.ordered_loader(images), self.trainer, source,
                         self.channels_last, writer, f"extracting {split} features")
                os.fsync(file.fileno())
            if writer.rows != n or writer.labels is None:
                # Files that turned unreadable since the check were dropped: the rows are fewer than
                # the key's images, so not kept (as before: such an entry would never be accepted).
                log.warning("feature cache: %d of %d %s images could be read; the features are not kept",
                            writer.rows, n, split)
                shape = (writer.rows, *(writer.shape or (0,))[1:])
                rows = np.memmap(tmp, np.float32, "r", offset=writer.header_bytes, shape=shape) \
                    if writer.rows else np.empty(shape, np.float32)
                labels = writer.labels[:writer.rows] if writer.labels is not None else torch.empty(0, dtype=torch.long)
                return TensorDataset(torch.from_numpy(np.array(rows)), labels)
            path.unlink(missing_ok=True)  # an old entry of this key must not be paired with the new file
            os.replace(tmp, features)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._save(path, {"key": parts, "labels": writer.labels, "shape": list(writer.shape),
                          "features_bytes": features.stat().st_size})
        log.info("feature cache: computed %s features of %d images to %s", split, n, features)
        return MappedFeatures(features, writer.labels)

    def _save(self, path: Path, entry: dict[str, Any]) -> None:
        """Written to a temp name in the same folder and renamed into place: never half an entry."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(entry, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
