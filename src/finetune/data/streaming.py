"""`data=streaming`: train from the LitData chunks `python -m finetune.cli.optimize` wrote, in a local
folder or under an `s3://` URI (how either is read: `finetune.data.storage`).

A converted data set is DIR/{train,val,test}/ (each a LitData dataset: index.json and chunks of
{"image": JPEG bytes at the resize size, "label": int}) and DIR/finetune.json (class names, the
source's preprocessing and image size, images per split), written last: its presence means the
conversion finished.

Training streams shuffled chunks through LitData's `StreamingDataLoader` (each rank its share under
DDP; its state_dict resumes a killed epoch). Validation and test read the same chunks by index
through the shared map-style path, so under DDP each image counts once (`UnrepeatedDistributedSampler`)
and the frozen-feature cache sees the whole split on every rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from litdata import StreamingDataLoader, StreamingDataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from finetune.data.datamodule import ImageDataModule
from finetune.data.storage import (
    CONVERT,
    allow_plain_http_endpoint,
    is_remote,
    join,
    normalise_dir,
    read_bytes,
)
from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")
METADATA = "finetune.json"
FORMAT = 1
SPLITS = ("train", "val", "test")


def read_metadata(input_dir: str) -> dict[str, Any]:
    """The converted data set's finetune.json: classes, preprocessing, source size, split sizes."""
    uri = join(input_dir, METADATA)
    missing = (f"data.input_dir={input_dir} holds no converted data set ({METADATA} missing); "
               f"convert one into it with {CONVERT.format(uri=input_dir)}")
    meta = json.loads(read_bytes(uri, missing))
    if meta.get("format") != FORMAT:
        raise FinetuneError(f"{uri} is format {meta.get('format')}, this version reads {FORMAT}; "
                            f"convert the data again with {CONVERT.format(uri=input_dir)}")
    return meta


def check_index(index: str, data: bytes, input_dir: str) -> None:
    """LitData's index.json (its chunks and their layout) parsed and shaped as LitData reads it; a
    damaged one (truncated, edited, another file) is one line naming it and the command that
    rebuilds it, not a traceback from inside a loader worker."""
    try:
        parsed = json.loads(data)
        why = None if isinstance(parsed, dict) else "not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        parsed, why = None, f"not JSON: {e}"
    if why is None:
        chunks, config = parsed.get("chunks"), parsed.get("config")
        if not isinstance(chunks, list) or not chunks or not all(isinstance(c, dict) and "filename" in c for c in chunks):
            why = "no list of chunks"
        elif not isinstance(config, dict) or "data_format" not in config:
            why = "no chunk layout (config.data_format)"
    if why:
        raise FinetuneError(f"{index} is damaged ({why}); rebuild the converted data with "
                            f"{CONVERT.format(uri=input_dir)} (into a new folder, or after removing this one)")


def decode_image(data: bytes) -> Image.Image:
    """Stored JPEG bytes as 8-bit RGB (stored upright and in RGB already)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")



class StreamingImages(StreamingDataset):
    """LitData's StreamingDataset yielding (transformed image, label), as the other sources do."""

    def __init__(self, input_dir: str, image_transform: Callable | None = None, **kwargs: Any) -> None:
        super().__init__(input_dir, **kwargs)
        self.image_transform = image_transform

    def __getitem__(self, index: Any) -> tuple[Any, int]:
        item = super().__getitem__(index)
        image = decode_image(item["image"])
        return (self.image_transform(image) if self.image_transform else image), int(item["label"])


class StreamingSplit(Dataset):
    """One split of a converted data set, read by index (map-style): for evaluation, the feature
    cache and the resumable samplers, which need every image on every rank. `stream()` gives the
    shuffled, rank-sharded LitData dataset that training iterates."""

    def __init__(self, input_dir: str, split: str, size: int, transform: Callable | None,
                 cache_dir: str | None, index_digest: str) -> None:
        self.input_dir, self.split, self.size, self.transform = input_dir, split, size, transform
        self.cache_dir, self.index_digest = cache_dir, index_digest
        self.root = join(input_dir, split)  # how file-check reports name a split
        self._reader: StreamingImages | None = None

    def stream(self, **kwargs: Any) -> StreamingImages:
        """A fresh LitData dataset over this split (`shuffle`, `drop_last`, `seed` in `kwargs`)."""
        return StreamingImages(self.root, image_transform=self.transform, cache_dir=self.cache_dir, **kwargs)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self._reader is None:  # per process: loader workers open their own
            self._reader = self.stream()
        return self._reader[int(index)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def fingerprint(self) -> tuple[Any, ...]:
        """What the feature cache keys this split on: the data set and the digest of its index.json
        (which lists every chunk with its size and item count, so rewritten data changes it)."""
        return (FORMAT, self.input_dir, self.split, self.size, self.index_digest)


class ResumableStreamingLoader(StreamingDataLoader):
    """LitData's loader, whose resumed epoch is followed by full ones under Lightning.

    After `load_state_dict` LitData replays the saved position until an epoch runs to its end; but
    Lightning stops after len(loader) batches without exhausting the iterator, so LitData kept
    replaying the finished epoch's end: every later epoch was empty, silently. Here the replay
    lasts one epoch.
    """

    _iterated_since_restore = True

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._iterated_since_restore = False

    def __iter__(self) -> Any:
        if self.restore and self._iterated_since_restore:
            self.restore = False  # the restored epoch is over: start the next one afresh
        self._iterated_since_restore = True
        yield from super().__iter__()


class StreamingDataModule(ImageDataModule):
    """Images from a data set converted by `python -m finetune.cli.optimize`: the source's classes and
    preprocessing (its explicit data.* settings, on top of the model's, `source_preprocessing`),
    then this config's."""

    def __init__(self, input_dir: str, cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_dir = normalise_dir(str(input_dir))
        if is_remote(self.input_dir):
            allow_plain_http_endpoint()
        if cache_dir and is_remote(self.input_dir):  # one folder per data set: chunks never mix
            digest = hashlib.sha256(self.input_dir.encode()).hexdigest()[:12]
            cache_dir = str(Path(cache_dir).expanduser() / digest)
        self.cache_dir = cache_dir if is_remote(self.input_dir) else None  # local chunks are read in place

    @cached_property
    def metadata(self) -> dict[str, Any]:
        return read_metadata(self.input_dir)

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    def source_size(self) -> int | None:
        return self.metadata.get("source_size")

    def source_preprocessing(self) -> dict[str, Any]:
        """The source's explicit settings at conversion: the transforms the source itself would
        have had. The pixels were decoded at conversion, so `draft_decode` is the source's
        (predict and export decode files as the images were)."""
        stored = self.metadata["preprocessing"]
        return {**self.metadata.get("overrides", {}), "draft_decode": stored.get("draft_decode", True)}

    def use_preprocessing(self, p: Preprocessing) -> None:
        super().use_preprocessing(p)
        short, stored_short = max(p.resize_size, p.crop_size), self.metadata.get("short_side")
        if stored_short and short > stored_short and (self.source_size() or short) > stored_short:
            log.warning("%s stores images with short side %d px, but this run resizes to %d px: they are "
                        "upsampled; convert again with this model and sizes for full detail",
                        self.input_dir, stored_short, short)

    def prepare_data(self) -> None:
        self.metadata  # noqa: B018  (reads it: a bad URI or missing data fails here, in one line)

    def make_split(self, split: str, transform: Callable | None) -> Dataset | None:
        size = self.metadata["splits"].get(split)
        if size is None:
            return None
        index = join(self.input_dir, split, "index.json")
        missing = (f"{index} is missing: the conversion into {self.input_dir} did not finish; "
                   f"run {CONVERT.format(uri=self.input_dir)} again")
        data = read_bytes(index, missing)
        check_index(index, data, self.input_dir)
        digest = hashlib.sha256(data).hexdigest()
        return StreamingSplit(self.input_dir, split, int(size), transform, self.cache_dir, digest)

    def training_loader(self, dataset: Dataset) -> DataLoader:
        """LitData's loader over the split's chunks: shuffled chunks, each rank its share (equal
        shares under DDP, so the ranks step together), and a state_dict that Lightning keeps in
        checkpoints. A stand-in (LP-FT's cached features) is iterated as every source's is."""
        if not isinstance(dataset, StreamingSplit):
            return super().training_loader(dataset)
        settings = self.loader_settings("train")
        log.info("train loader (streaming %s): batch %d, %d workers", dataset.root, settings.batch_size,
                 settings.num_workers)
        # drop_last: equal shares per rank under DDP, and no last batch of one image (it breaks
        # BatchNorm); LitData drops each worker's incomplete last batch.
        trainer = self.trainer
        drop_last = (trainer.world_size if trainer else 1) > 1 or len(dataset) > settings.batch_size
        stream = dataset.stream(shuffle=True, drop_last=drop_last, seed=self.seed)
        # A generator of its own: creating each epoch's iterator draws the workers' base seed, and from
        # the global RNG that draw would shift dropout after a resume (see ResumeState).
        return ResumableStreamingLoader(stream, generator=torch.Generator().manual_seed(self.seed),
                                        **settings.kwargs())
