"""`python -m finetune.cli.optimize data=<source> output=DIR_OR_URI`: convert any data source to LitData
chunks once, then train from them with `data=streaming data.input_dir=DIR_OR_URI`.

Every split of the source (val split off train with the source's own seed when it has none, so the
streaming run validates on the same images) is written by `litdata.optimize` over all the CPUs, with
its progress bar, as {"image": JPEG bytes with the short side shrunk to the size training reads, by
`data.cache`'s own function (`finetune.data.jpeg`), "label": int}. A split whose index.json exists
is done and skipped; an interrupted split continues from LitData's checkpoints (`use_checkpoint`). finetune.json, written
last, records the classes, the preprocessing (with the source's explicit settings) and the source's
image size, so training from the chunks uses the transforms the source would have had.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset

from finetune.cli.config_source import entry_point
from finetune.data.datamodule import ImageDataModule
from finetune.data.jpeg import jpeg_bytes
from finetune.data.preprocessing import decide_for
from finetune.data.storage import (
    allow_plain_http_endpoint,
    exists,
    is_remote,
    join,
    normalise_dir,
    write_bytes,
)
from finetune.data.streaming import FORMAT, METADATA, StreamingDataModule
from finetune.data.subsets import drop_late_failures
from finetune.data.workers import available_cpus
from finetune.errors import FinetuneError
from finetune.models import weights as weights_lib

log = logging.getLogger("finetune")
CHUNK_BYTES = "64MB"
# Workers forked rather than spawned: a spawned worker imports torch and the package again (seconds
# each, tens of seconds on a loaded machine); the work in them is PIL only.
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class EncodeImages:
    """`litdata.optimize`'s fn: index -> the sample as stored (picklable, runs in its workers).
    An image that no longer decodes (the source's datasets return None for it) is left out."""

    def __init__(self, dataset: Dataset, short_side: int) -> None:
        self.dataset, self.short_side = dataset, short_side

    def __call__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is None:  # LitData writes nothing for None
            return None
        image, label = item
        return {"image": jpeg_bytes(image, self.short_side), "label": int(label)}


def source_splits(datamodule: ImageDataModule) -> dict[str, Dataset]:
    """The source's splits as (PIL image, label) pairs, with the val split the source's own setup
    would use; files found unreadable are dropped rather than replaced by a neighbour."""
    train, val = datamodule.make_split("train", None), datamodule.make_split("val", None)
    if val is None:
        train, val = datamodule.split_off_val(train, train)
    splits = {"train": train, "val": val, "test": datamodule.make_split("test", None)}
    for dataset in splits.values():
        drop_late_failures(dataset)
    return splits


def convert(data_cfg: DictConfig, model_name: str, weights: str | None, output: str,
            num_workers: int | None = None) -> dict[str, Any]:
    """Write every split of the source `data_cfg` describes under `output`; returns the metadata."""
    datamodule = hydra.utils.instantiate(data_cfg)
    if isinstance(datamodule, StreamingDataModule):
        raise FinetuneError("data=streaming is converted already; pass the source it came from "
                            "(data=folder data.root=DIR, data=hotdog, data=cifar10, data=shapes)")
    output = normalise_dir(output)
    if is_remote(output):
        allow_plain_http_endpoint()
    defaults = weights_lib.resolve(model_name, weights).preprocessing  # the weights' sizes: no network built
    p = decide_for(datamodule, defaults)
    datamodule.prepare_data()
    short_side = max(p.resize_size, p.crop_size)
    workers = num_workers or available_cpus()
    sizes = {}
    for split, dataset in source_splits(datamodule).items():
        sizes[split] = _optimize_split(dataset, join(output, split), short_side, workers)
    meta = {
        "format": FORMAT,
        "classes": list(datamodule.classes),
        "preprocessing": p.as_dict(),
        "overrides": {k: _plain(v) for k, v in datamodule.overrides.items() if v is not None},
        "source_size": datamodule.source_size(),
        "short_side": short_side,
        "splits": sizes,
        "source": OmegaConf.to_container(data_cfg, resolve=True),
    }
    write_bytes(join(output, METADATA), json.dumps(meta, indent=2).encode())
    log.info("converted %s into %s: %s", data_cfg._target_, output, sizes)
    return meta


def _plain(value: Any) -> Any:
    """A config value as JSON can hold it (lists from ListConfig and tuples)."""
    if isinstance(value, (ListConfig, DictConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, tuple) else value


def _optimize_split(dataset: Dataset, target: str, short_side: int, workers: int) -> int:
    """One split as LitData chunks at `target` (skipped when finished before); its image count."""
    from litdata import optimize
    from litdata.streaming.dataset import StreamingDataset

    index = join(target, "index.json")
    if not exists(index):
        log.info("writing %d images to %s with %d workers", len(dataset), target, workers)
        optimize(fn=EncodeImages(dataset, short_side), inputs=list(range(len(dataset))), output_dir=target,
                 chunk_bytes=CHUNK_BYTES, num_workers=min(workers, max(1, len(dataset))),
                 use_checkpoint=True, verbose=True, start_method=START_METHOD)
    else:
        log.info("%s is complete; skipped", target)
    return len(StreamingDataset(target, cache_dir=None))


def convert_and_say(cfg: DictConfig) -> None:
    """`convert` the configured source, then print where the chunks are and how to train from them."""
    meta = convert(cfg.data, cfg.model.name, cfg.model.get("weights"), str(cfg.output), cfg.get("num_workers"))
    print(f"wrote {meta['splits']} images of {len(meta['classes'])} classes to {normalise_dir(str(cfg.output))}; "
          f"train with: python train.py data=streaming data.input_dir={normalise_dir(str(cfg.output))}")


main = entry_point("optimize", convert_and_say)

if __name__ == "__main__":
    main()
