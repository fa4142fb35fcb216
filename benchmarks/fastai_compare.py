"""fastai's `fine_tune` on the photos, split and network of `benchmarks/recipes.py`: the baseline
the default recipe (`experiment=offline_finetune`) must match in accuracy and beat in wall time.

fastai 2.8 pins torch<2.9; the project runs a newer torch, which must stay. So fastai goes into a
venv that sees the system packages (torch, torchvision, timm, this project), installed without its
dependencies, with the few pure-python or self-contained ones it imports added the same way:

    python -m venv --system-site-packages ../venv-fastai
    ../venv-fastai/bin/pip install --no-deps fastai==2.8.4 fastcore==1.8.18 fasttransform==0.0.2 \\
        plum-dispatch==2.5.7 beartype fastprogress==1.0.3 fastdownload==0.0.7 pandas scikit-learn \\
        joblib threadpoolctl narwhals
    PYTHONPATH=src ../venv-fastai/bin/python benchmarks/fastai_compare.py --scale 900 \\
        --archive ../shared/data/cifar10-jpeg.tar.gz
    ... --scale smoke       # seconds: 4+2 photos per class, or generated shapes without the archive

(fastcore<1.9 is fastai 2.8.4's own pin; fasttransform 0.0.2 and plum-dispatch<2.10 go with it;
fastprogress 1.1 imports fasthtml, 1.0.3 does not.)

Like for like with `recipes.py`:
- photos: `recipes.scale_data` itself (the same subset of the archive, or the same generated shapes);
- validation: the files our data module holds out (`FolderDataModule.split_off_val` with the
  experiment's `data.seed` and the benchmark's `val_fraction`), test: the same test folder;
- network: the packaged ImageNet EfficientNet-Lite0 built by the project (`weights.resolve` +
  `backbones.load_network` for `experiment=offline_finetune`'s `model.name` / `model.weights`),
  handed to fastai's `vision_learner` as its architecture: fastai cuts it at the pooling layer
  (`create_body`) and adds its own fresh head (concat pooling, BatchNorm, dropout, 512 hidden units),
  normalised with the weights' mean and std;
- 224 px (the 32-px photos upsampled), batch 32, fp32 on the CPU (fastai's default; `recipes.py`
  runs at the product's `trainer.precision=auto`, bf16 on a CPU with AMX: `--precision 32-true`
  there for fp32 on both sides).

fastai's defaults, not ours: `fine_tune(3, base_lr=2e-3)` = one frozen epoch (one-cycle, peak 2e-3),
then 3 epochs of the whole network with one-cycle at slice(1e-5, 1e-3) (discriminative rates: body
1e-5 .. head 1e-3), Adam with fastai's weight decay 0.01 (true weight decay, not on BatchNorm/bias),
BatchNorm layers trained (and in train mode, batch statistics) in both phases, the last incomplete
training batch of each epoch dropped (fastai's loader: 900 train photos = 28 batches of 32). No
checkpoint selection: the last epoch's weights are tested, as `fine_tune` leaves them. Augmentation: fastai's
`aug_transforms()` on the batch (flips, rotation up to 10 deg, zoom up to 1.1, lighting 0.2, warp
0.2) after `Resize(224)` per image (`--no-aug`: Resize only); ours trains on random-resized crops of
scale (0.5, 1) and flips, bicubic.

Wall time is everything after the photos are on disk: the split, the network, the data loaders,
`fine_tune` and both evaluations (`recipes.py` times the product's fit + test the same way). Last
line: `fastai_acc= fastai_val_acc= wall_s= scale=`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from _common import CIFAR_TARBALL, product_config, scratch_dir
from hydra.utils import instantiate
from recipes import SCALES, scale_data

from finetune.models import backbones, weights

warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)  # fastai's import

try:
    import pandas as pd
    from fastai.vision.all import (
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        set_seed,
        vision_learner,
    )
except ImportError as error:  # say how to get it rather than a traceback
    sys.exit(f"fastai does not import ({error}); install it in its own venv as the docstring of "
             f"{Path(__file__).name} says, then run this script with that venv's python")


def split_files(root: Path, val_fraction: float, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train+val table, test table, the composed config): file names relative to `root`, labels
    and `is_valid`, with validation exactly the files our data module would hold out."""
    cfg = product_config(["experiment=offline_finetune", f"data.root={root}",
                          f"data.val_fraction={val_fraction:.6f}"], out)
    dm = instantiate(cfg.data)
    train = dm.make_split("train", None)
    _, val = dm.split_off_val(train, train)  # the seeded split (val_split.draw), nothing written
    held = set(val.indices)
    names = [Path(path).relative_to(root / "train").as_posix() for path, _ in train.samples]
    if sorted(names[i] for i in held) != sorted(dm.split_keeper.record["val"]):  # the record our runs write
        raise RuntimeError("the validation files differ from the data module's split record")

    def table(dataset, split: str, mark_val: bool) -> pd.DataFrame:
        rows = [(f"{split}/{Path(path).relative_to(root / split).as_posix()}", dm.classes[label],
                 mark_val and i in held) for i, (path, label) in enumerate(dataset.samples)]
        return pd.DataFrame(rows, columns=["name", "label", "is_valid"])

    return table(train, "train", True), table(dm.make_split("test", None), "test", False), cfg


def our_network(name: str, weights_value: str):
    """fastai's `arch`: a callable that returns the whole network; here the project's own, its
    weights loaded by the project (fastai's `pretrained` flag cannot change them)."""
    spec = weights.resolve(name, weights_value)

    def arch(pretrained: bool = True, **_):
        return backbones.load_network(spec)

    arch.__name__ = name
    return arch, spec.preprocessing


def run(root: Path, val_fraction: float, args: argparse.Namespace, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    items, test, cfg = split_files(root, val_fraction, out)
    set_seed(cfg.seed)
    arch, p = our_network(cfg.model.name, cfg.model.weights)
    batch_tfms = [*([] if args.no_aug else aug_transforms()), Normalize.from_stats(list(p.mean), list(p.std))]
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=sorted(items.label.unique()))),
                      get_x=ColReader("name", pref=f"{root}/"), get_y=ColReader("label"),
                      splitter=ColSplitter("is_valid"), item_tfms=Resize(args.image_size), batch_tfms=batch_tfms)
    n_train, n_val = int((~items.is_valid).sum()), int(items.is_valid.sum())
    # fastai drops the last incomplete training batch: with fewer images than a batch (the smoke
    # scale) nothing would train, so the batch shrinks to the training set there.
    bs = min(args.batch_size, n_train)
    if bs < args.batch_size:
        print(f"batch {bs}: only {n_train} training images", flush=True)
    dls = block.dataloaders(items, bs=bs, device="cpu",
                            **({} if args.num_workers is None else {"num_workers": args.num_workers}))
    learn = vision_learner(dls, arch, normalize=False, metrics=accuracy)  # Normalize is in batch_tfms
    print(f"fastai: {n_train} train, {n_val} val, {len(test)} test images; body {type(learn.model[0]).__name__} "
          f"of {cfg.model.name} ({cfg.model.weights}), fastai head {sum(q.numel() for q in learn.model[1].parameters())} "
          f"params; fine_tune({args.epochs}, base_lr={args.base_lr:g}, freeze_epochs={args.freeze_epochs}); "
          f"augmentation {'none' if args.no_aug else 'aug_transforms()'}", flush=True)
    with learn.no_bar():
        print("epoch, train_loss, valid_loss, accuracy, time (the frozen epoch(s) first)", flush=True)
        fit_start = time.perf_counter()
        learn.fine_tune(args.epochs, base_lr=args.base_lr, freeze_epochs=args.freeze_epochs)
        fit_s = time.perf_counter() - fit_start
        _, val_acc = learn.validate()
        _, test_acc = learn.validate(dl=dls.test_dl(test, with_labels=True))
    return {"val_acc": float(val_acc), "test_acc": float(test_acc), "fit_s": fit_s,
            "wall_s": time.perf_counter() - start, "n_val": n_val, "n_test": len(test), "batch": bs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=CIFAR_TARBALL, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--scale", nargs="+", default=["900"], choices=list(SCALES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="fine_tune's epochs after the frozen one(s)")
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--base-lr", type=float, default=2e-3, help="fine_tune's base_lr (fastai's default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="fastai's default: the CPUs, at most 16")
    parser.add_argument("--no-aug", action="store_true", help="Resize only, no aug_transforms()")
    args = parser.parse_args()

    work = scratch_dir("fastai-compare-")
    last_line = ""
    for scale in args.scale:
        root, val_fraction, what, _ = scale_data(scale, args, work)
        m = run(root, val_fraction, args, work / f"{scale}-run")
        print(f"[{scale}] {what}; {args.image_size} px, fp32 CPU, batch {m['batch']}: fastai fine_tune: "
              f"val {m['val_acc']:.4f} ({m['n_val']} images), test {m['test_acc']:.4f} ({m['n_test']} images), "
              f"fine_tune {m['fit_s']:.0f} s, wall {m['wall_s']:.0f} s", flush=True)
        last_line = f"fastai_acc={m['test_acc']:.4f} fastai_val_acc={m['val_acc']:.4f} wall_s={m['wall_s']:.0f} scale={scale}"
    print(last_line)


if __name__ == "__main__":
    main()
