"""What finding unreadable files costs, against one training epoch at the default settings.

Every image file of a folder source is decoded once at reduced scale before training (see
`finetune.data.file_checks`); the results are remembered per file, so a second run on the same
folder only stats the files. This measures both on the 60,000 CIFAR-10 photos beside the checkout
and sets them against one epoch of `python train.py data=folder data.root=DIR` at the defaults
(ResNet-18 at 224, batch 32; random init, since the timing does not depend on the weights), whose
rate is measured over steps after warm-up and scaled to the epoch's batches.

    python benchmarks/file_checks.py [--data-root DIR] [--steps N]

The last line is `check_cold=<s> check_warm=<s> epoch=<s> cold_fraction=<x>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import StepTimer, cifar_jpeg_root, product_config, scratch_dir

from finetune.cli.train import build
from finetune.data.file_checks import FileChecks
from finetune.data.resized_cache import list_images
from finetune.data.workers import available_cpus


def time_checks(root: Path, memo: Path) -> tuple[float, float, int]:
    files = [str(root / rel) for rel, _, _ in list_images(root)]
    start = time.perf_counter()
    bad = FileChecks(root, memo, available_cpus()).unreadable(files)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = FileChecks(root, memo, available_cpus()).unreadable(files)
    warm = time.perf_counter() - start
    assert bad == again
    print(f"{len(files)} files, {len(bad)} unreadable: cold {cold:.1f} s, warm {warm:.2f} s", flush=True)
    return cold, warm, len(files)


def epoch_seconds(root: Path, steps: int, work: Path) -> float:
    """One epoch of the default folder recipe, from the rate of `steps` steps after 5 of warm-up."""
    cfg = product_config([f"data.root={root}", "data=folder", "model.weights=null", "logger=csv",
                          "callbacks=none", f"+trainer.limit_train_batches={steps + 5}",
                          "trainer.max_epochs=1", "+trainer.limit_val_batches=0", "test=false"], work)
    datamodule, model, trainer = build(cfg)
    timer = StepTimer(warmup=5)
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=datamodule)
    batches = len(datamodule.datasets["train"]) // datamodule.batch_size
    print(f"training: {timer.rate:.1f} img/s over {steps} steps; an epoch is {batches} batches", flush=True)
    return batches * datamodule.batch_size / timer.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="an ImageFolder tree (default: the CIFAR-10 copy)")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    root = args.data_root or cifar_jpeg_root()
    if root is None:
        print("skipped: no --data-root and no ../shared/data/cifar10-jpeg.tar.gz")
        sys.exit(0)
    work = scratch_dir("file-checks-")
    cold, warm, _ = time_checks(root, work / "memo")
    epoch = epoch_seconds(root, args.steps, work / "run")
    print(f"check_cold={cold:.1f} check_warm={warm:.2f} epoch={epoch:.0f} cold_fraction={cold / epoch:.3f}")


if __name__ == "__main__":
    main()
