"""Images per second of the train loader alone, for the same photos read three ways:

    folder     the image folder itself (data=folder: decode each 500x375 JPEG, then the transforms)
    cache      the resized copy data.cache=true keeps (JPEGs shrunk to the resize size)
    streaming  LitData chunks on local disk (`python -m finetune.cli.optimize`, then data=streaming)

Photos the size of the hot-dog set's: CIFAR-10 photos (the copy in ../shared) upscaled to 500x375
and saved as JPEG quality 90. One process and the product's default worker count; each arm's loader
is built through its data module as training builds it (ResNet preprocessing: 224 crop, 256 resize)
and read for one whole epoch, batches discarded. The arms alternate, in a rotated order each repeat;
the median and the spread (min-max) of each are printed.

    python benchmarks/streaming.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--per-class 200]
                                   [--repeats 5] [--workers N]

The last line is `folder=<img/s> cache=<img/s> streaming=<img/s>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tarfile
import time
from pathlib import Path

from _common import CIFAR_TARBALL, product_config, scratch_dir
from PIL import Image

from finetune.cli.optimize import convert
from finetune.data.folder import FolderDataModule
from finetune.data.preprocessing import decide_for
from finetune.data.streaming import StreamingDataModule
from finetune.data.transforms import Preprocessing
from finetune.data.workers import default_num_workers

SIZE = (500, 375)  # the hot-dog photos' typical size
PREPROCESSING = Preprocessing()  # ResNet's: crop 224, resize 256


def make_photos(archive: Path, dst: Path, per_class: int) -> Path:
    """dst/{train,test}/<class>/*.jpg: the first `per_class` CIFAR-10 train photos of each class (a
    quarter as many test photos), upscaled to 500x375 (bicubic), JPEG quality 90."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4:
                continue
            split, cls = parts[1], parts[2]
            limit = per_class if split == "train" else max(1, per_class // 4)
            if counts.get((split, cls), 0) >= limit:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            target = dst / split / cls / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(tar.extractfile(member)) as image:
                image.convert("RGB").resize(SIZE, Image.Resampling.BICUBIC).save(target, quality=90)
    return dst


def epoch_rate(datamodule) -> float:
    """Images per second over one epoch of `datamodule`'s train loader (worker start-up included)."""
    datamodule.setup("fit")
    start, images = time.perf_counter(), 0
    for batch_images, _ in datamodule.train_dataloader():
        images += len(batch_images)
    return images / (time.perf_counter() - start)


def arms(root: Path, work: Path, workers: int, batch_size: int) -> dict:
    """name -> a function making a fresh data module for that arm (copies built before timing)."""
    # One epoch per loader: persistent workers would only outlive it.
    common = {"batch_size": batch_size, "num_workers": workers, "seed": 0, "skipped_csv": None,
              "persistent_workers": False}

    def folder(cache: bool) -> FolderDataModule:
        dm = FolderDataModule(str(root), cache=cache, cache_dir=str(work / "cache"), **common)
        decide_for(dm, PREPROCESSING)
        dm.prepare_data()  # the checks and, with cache, the resized copy
        return dm

    cfg = product_config(["data=folder", f"data.root={root}", "model.weights=null"], work / "cfg")
    convert(cfg.data, cfg.model.name, None, str(work / "chunks"))

    def streaming() -> StreamingDataModule:
        dm = StreamingDataModule(str(work / "chunks"), **common)
        decide_for(dm, PREPROCESSING)
        return dm

    folder(True)  # build the resized copy now, outside the timing
    return {"folder": lambda: folder(False), "cache": lambda: folder(True), "streaming": streaming}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", type=Path, default=CIFAR_TARBALL)
    parser.add_argument("--per-class", type=int, default=200, help="train photos per class (10 classes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the product's)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not args.archive.exists():
        print(f"skipped: no CIFAR-10 JPEG archive at {args.archive} (pass --archive PATH)")
        return
    workers = default_num_workers() if args.workers is None else args.workers
    work = scratch_dir("streaming-bench-")
    root = make_photos(args.archive, work / "photos", args.per_class)
    makers = arms(root, work, workers, args.batch_size)
    names = list(makers)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            rates[name].append(epoch_rate(makers[name]()))
        print(f"repeat {repeat + 1}: " + " ".join(f"{n}={rates[n][-1]:.0f}" for n in names), flush=True)
    print(f"{args.per_class * 10} photos of {SIZE[0]}x{SIZE[1]}, batch {args.batch_size}, {workers} workers")
    for name in names:
        print(f"{name}: median {statistics.median(rates[name]):.0f} img/s, "
              f"spread {min(rates[name]):.0f}-{max(rates[name]):.0f}")
    print(" ".join(f"{name}={statistics.median(rates[name]):.0f}" for name in names))


if __name__ == "__main__":
    sys.exit(main())
