"""Frozen-feature cache: 10 epochs of the frozen recipe with and without the cache, side by side.

    python benchmarks/frozen_cache.py                       # generated shapes, 224 px, ResNet-50
    python benchmarks/frozen_cache.py --data-root DIR       # any ImageFolder tree (train/, test/)
    python benchmarks/frozen_cache.py --weights DEFAULT     # real ImageNet weights if cached

Both runs use the product's own config (experiment=hotdog_frozen with data=folder), the same data,
seed and epochs; only `finetune.callback.feature_cache` differs. Timing covers `trainer.fit`
(feature extraction included for the cached run). Last line:
    speedup=<uncached/cached> acc_cached=<a> acc_uncached=<b>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
from _common import product_config, scratch_dir

from finetune.data.shapes import write_image_folder
from finetune.train import build


def run(overrides: list[str], out_dir: Path) -> tuple[float, float]:
    """Fit with `overrides`; return (fit seconds, test accuracy)."""
    cfg = product_config(overrides, out_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    trainer.test(model, datamodule=datamodule, verbose=False)
    return seconds, float(trainer.callback_metrics["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="ImageFolder tree; default: generated shapes")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default="null", help="DEFAULT, a weights name, a file, or null")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--per-class", type=int, default=40, help="generated train images per class")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    work = scratch_dir("frozen-cache-")
    root = args.data_root or write_image_folder(
        work / "shapes", {"train": args.per_class, "test": max(4, args.per_class // 4)}, size=64
    )
    common = [
        "experiment=hotdog_frozen", "data=folder", f"data.root={root}", f"model.name={args.model}",
        f"model.weights={args.weights}", f"data.image_size={args.image_size}",
        f"data.resize_size={args.image_size}", f"trainer.max_epochs={args.epochs}",
        "data.num_workers=0", "callbacks=none", "logger=[]", "trainer.precision=bf16-mixed",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        "+trainer.enable_checkpointing=false",
    ]
    t_uncached, acc_uncached = run(common + ["finetune.callback.feature_cache=false"], work / "uncached")
    t_cached, acc_cached = run(common + ["finetune.callback.feature_cache=true"], work / "cached")
    print(f"data: {root}  model: {args.model} ({args.weights})  size: {args.image_size}  epochs: {args.epochs}")
    print(f"uncached: {t_uncached:.1f} s, test acc {acc_uncached:.4f}")
    print(f"cached:   {t_cached:.1f} s, test acc {acc_cached:.4f}")
    print(f"speedup={t_uncached / t_cached:.2f} acc_cached={acc_cached:.4f} acc_uncached={acc_uncached:.4f}")


if __name__ == "__main__":
    main()
