"""Training images/s end to end: the product's defaults against the seed recipe, on the same data.

ours:    `python train.py data=folder data.root=CIFAR` as configured by default (precision auto,
         channels_last, 32-pixel JPEGs cropped at their own size and upsampled per batch, freed
         memory kept for reuse).
seed:    ImageFolder + per-image Pillow Resize(224) + ToTensor + Normalize, fp32, NCHW, glibc's
         allocator defaults; the same Trainer, model (ResNet-18 at 224, random init), batch size
         and worker count. Runs first: the allocator setting lasts for the process once made.
seed+allocator: the seed again, now with the product's allocator setting; ours/this is the gain
         from precision, memory format and pipeline alone (the compute figure is also taken
         before and after the allocator setting).
compute: the product's model and precision on in-memory 224-pixel batches (no input pipeline).
Data: ../shared/data/cifar10-jpeg.tar.gz beside the checkout when present (unpacked to a temp
dir), else generated 32-pixel JPEGs. Also prints a pipeline-only figure per loader process:
500x375 and 1600x1200 JPEGs decoded and transformed to 224 by the product's loader vs the seed's.

    python benchmarks/throughput.py [--steps 24] [--repeat 2]
    last line: speedup=<ours/seed> ours=<img/s> seed=<img/s> compute=<img/s>
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import StepTimer, cifar_jpeg_root, product_config, scratch_dir
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from finetune.cli.train import build
from finetune.data.folder import load_rgb
from finetune.data.shapes import write_image_folder
from finetune.data.transforms import Preprocessing, train_transform
from finetune.data.workers import default_num_workers

SEED_TRANSFORM = T.Compose([T.Resize(224), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def fit_rate(label: str, overrides: list[str], steps: int, warmup: int, loader=None) -> float:
    out = scratch_dir("throughput-")
    cfg = product_config(["data=folder", "model.weights=null", f"+trainer.max_steps={steps}",
                          "+trainer.limit_val_batches=0", "test=false", "logger=csv", *overrides], out)
    datamodule, model, trainer = build(cfg)
    timer = StepTimer(warmup)
    trainer.callbacks.append(timer)
    if loader is None:
        trainer.fit(model, datamodule=datamodule)
    else:
        trainer.fit(model, train_dataloaders=loader)
    print(f"  {label}: precision={cfg.trainer.precision} channels_last={cfg.model.channels_last} "
          f"-> {timer.rate:.1f} img/s", flush=True)
    return timer.rate


def in_memory_batches(n: int, batch: int, classes: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def photos(folder: Path, n: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    yy, xx = yy * 500 / size[0], xx * 500 / size[0]
    paths = []
    for i in range(n):
        base = np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6), (xx + yy) * 0.2], -1)
        pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        paths.append(folder / f"{i:03d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def pipeline_rate(paths: list[Path], load, transform) -> float:
    for p in paths[:3]:
        transform(load(str(p)))
    start = time.perf_counter()
    for p in paths:
        transform(load(str(p)))
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--photos", type=int, default=40)
    args = parser.parse_args()

    tmp = scratch_dir("throughput-data-")
    # 500x375 is below twice the resize size, so draft mode cannot help there; 1600x1200 shows it.
    for w, h in ((500, 375), (1600, 1200)):
        paths = photos(tmp / f"photos{w}", args.photos, (w, h))
        ours_p = pipeline_rate(paths, partial(load_rgb, min_side=256), train_transform(Preprocessing()))
        seed_p = pipeline_rate(paths, default_loader, SEED_TRANSFORM)
        print(f"pipeline, {w}x{h} JPEG -> 224, per loader process: ours {ours_p:.0f} img/s, "
              f"seed {seed_p:.0f} img/s ({ours_p / seed_p:.2f}x)", flush=True)

    root = cifar_jpeg_root()
    source = "CIFAR-10 JPEG copy (../shared)"
    if root is None:
        root, source = write_image_folder(tmp / "gen", {"train": 64, "test": 8}, size=32, suffix=".jpg"), "generated 32px JPEGs"
    classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
    print(f"data: {source}; ResNet-18 at 224, batch {args.batch}, {args.steps - args.warmup} timed steps, "
          f"{torch.get_num_threads()} compute threads, seed loader {default_num_workers()} workers "
          f"(ours: the product's choice, logged as 'train loader')", flush=True)
    common = [f"data.root={root}", f"data.batch_size={args.batch}"]
    seed_loader = DataLoader(ImageFolder(str(root / "train"), transform=SEED_TRANSFORM), batch_size=args.batch,
                             shuffle=True, num_workers=default_num_workers(), drop_last=True)
    seed_recipe = [*common, "trainer.precision=32-true", "model.channels_last=false"]
    batches = DataLoader(in_memory_batches(args.steps, args.batch, classes), batch_size=None)
    glibc = ["reuse_freed_memory=false"]
    # The allocator setting lasts for the process, so everything with glibc's defaults runs first.
    # Within each phase the runs alternate; the best of each counts (other jobs share the CPU).
    phases = [
        {"seed": ([*seed_recipe, *glibc], seed_loader), "compute, glibc defaults": ([*common, *glibc], batches)},
        {"seed+allocator": (seed_recipe, seed_loader), "ours": (common, None), "compute": (common, batches)},
    ]
    best: dict[str, float] = {}
    for phase in phases:
        for _ in range(args.repeat):
            for label, (overrides, loader) in phase.items():
                rate = fit_rate(label, overrides, args.steps, args.warmup, loader)
                best[label] = max(best.get(label, 0.0), rate)
    seed, ours, compute = best["seed"], best["ours"], best["compute"]
    print("best of " + str(args.repeat) + ": " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
    print(f"ours/compute={ours / compute:.2f} ours/(seed+allocator)={ours / best['seed+allocator']:.2f} "
          f"allocator alone: fp32 seed {best['seed+allocator'] / seed:.2f}x, "
          f"bf16 compute {compute / best['compute, glibc defaults']:.2f}x")
    print(f"speedup={ours / seed:.2f} ours={ours:.1f} seed={seed:.1f} compute={compute:.1f}")


if __name__ == "__main__":
    main()
