"""Transfer recipes side by side on real photos: accuracy, calibration and wall time.

    python benchmarks/recipes.py                          # CIFAR-10 photos from ../shared (if present)
    python benchmarks/recipes.py --train-per-class 4 --test-per-class 2 --epochs 1 --image-size 64   # smoke run

Every recipe runs the product (`finetune.train.train`: fit, then test on the best checkpoint by
val/acc) on the same train/val/test subset, the same packaged ImageNet EfficientNet-Lite0, seed,
resolution and number of fine-tuning epochs. Only the strategy and its regularisation differ:

- linear probe: `experiment=offline_transfer` (frozen backbone, head on cached features);
- full fine-tune: every layer from a random head, head at 10x the backbone's rate;
- gradual: the head alone for one epoch on images, then the backbone at 0.1x;
- LP-FT: the head on cached features, then everything at 0.1x (`finetune=lp_ft`);
- LP-FT + EMA + mixup/cutmix (+ TTA): `experiment=offline_finetune` as shipped, tested with hflip TTA.

ECE is 15-bin top-label calibration error on the test split, from the network's own softmax and
after dividing the logits by the temperature fitted on the validation split (which the
checkpoint carries). Wall time is fit + test, the feature extraction included.

Last line: probe_acc=... best_acc=... best_recipe=... ece_before=... ece_after=... (the best recipe's ECE).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import CIFAR_TARBALL, product_config, scratch_dir
from frozen_cache import data_root

from finetune.train import train

# What each recipe adds to the common settings. The fine-tuning rows share the optimizer
# (AdamW, weight decay 0.05), the fine-tuning rate `--lr` for the backbone and `--epochs` epochs
# on images; the probing stages run at 10x that rate.
PROBE = ["experiment=offline_transfer", "trainer.max_epochs={probe_epochs}", "model.optimizer.lr={probe_lr}"]
# The fine-tuning rows without LP-FT start from the probe's experiment (offline_finetune's LP-FT
# knobs would not fit their strategy) with offline_finetune's optimizer, augmentation and batch.
FINETUNE = ["experiment=offline_transfer", "model.optimizer._target_=torch.optim.AdamW",
            "model.optimizer.weight_decay=0.05", "data.augment=true", "data.crop_scale=[0.5,1.0]",
            "trainer.max_epochs={epochs}"]
LP_FT = ["experiment=offline_finetune", "finetune.callback.lp_epochs={probe_epochs}", "model.optimizer.lr={probe_lr}",
         "trainer.max_epochs={lp_ft_epochs}"]
PLAIN = ["callbacks.ema=null", "data.mixup_alpha=0", "data.cutmix_alpha=0", "model.drop_path=null"]
RECIPES: dict[str, list[str]] = {
    "linear probe": PROBE,
    "full fine-tune": [*FINETUNE, "finetune=full", "model.head_lr_mult=10", "model.optimizer.lr={lr}"],
    "gradual": [*FINETUNE, "finetune=gradual", "finetune.callback.unfreeze_at_epoch=1",
                "finetune.callback.backbone_lr_mult=0.1", "model.optimizer.lr={probe_lr}"],
    "LP-FT": [*LP_FT, *PLAIN],
    "LP-FT + EMA + mixup/cutmix + TTA": [*LP_FT, "tta=hflip"],
}


def run(recipe: list[str], common: list[str], values: dict, out_dir: Path) -> dict[str, float]:
    cfg = product_config([o.format(**values) for o in recipe] + common, out_dir)
    start = time.perf_counter()
    metrics = train(cfg)
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=CIFAR_TARBALL, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--data-root", type=Path, help="an ImageFolder tree instead of the archive")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="epochs on images for every fine-tuning recipe")
    parser.add_argument("--probe-epochs", type=int, default=10, help="epochs of the probe on cached features")
    parser.add_argument("--lr", type=float, default=1e-4, help="the backbone's fine-tuning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--trainer", default="cpu", help="the trainer= config group: cpu, gpu")
    parser.add_argument("--only", nargs="*", help="run only these recipes (names as in the table)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every recipe")
    args = parser.parse_args()

    work = scratch_dir("recipes-")
    root, what = data_root(args, work)
    common = [
        f"data.root={root}", f"trainer={args.trainer}", f"trainer.precision={args.precision}",
        f"data.image_size={args.image_size}", f"data.resize_size={args.image_size}",
        f"data.batch_size={args.batch_size}", f"paths.data_dir={work / 'data'}",
        "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null", "callbacks.top_losses=null",
        "callbacks.confusion_matrix=null", "callbacks.lr_monitor=null", "logger=[]", "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false", *args.override,
    ]
    values = {"epochs": args.epochs, "probe_epochs": args.probe_epochs, "lr": args.lr, "probe_lr": 10 * args.lr,
              "lp_ft_epochs": args.probe_epochs + args.epochs}
    rows = {}
    for name, recipe in RECIPES.items():
        if args.only and name not in args.only:
            continue
        m = run(recipe, common, values, work / name.replace(" ", "_").replace("/", "-"))
        rows[name] = m
        print(f"{name}: test acc {m['test/acc']:.4f}, ECE {m['test/ece']:.4f} -> {m['test/ece_calibrated']:.4f}, "
              f"{m['wall_s']:.0f} s", flush=True)

    print(f"\ndata: {what}; {args.image_size} px, precision {args.precision}, batch {args.batch_size}; "
          f"{args.epochs} epochs on images at lr {args.lr:g} (probe: {args.probe_epochs} epochs at {10 * args.lr:g})")
    print(f"| {'recipe':<34} | test acc | ECE before | ECE after T | wall time |")
    print(f"|{'-' * 36}|---------:|-----------:|------------:|----------:|")
    for name, m in rows.items():
        print(f"| {name:<34} | {m['test/acc']:8.4f} | {m['test/ece']:10.4f} | {m['test/ece_calibrated']:11.4f} "
              f"| {m['wall_s']:7.0f} s |")
    best = max((n for n in rows if n != "linear probe"), key=lambda n: rows[n]["test/acc"], default=None)
    if best is None or "linear probe" not in rows:
        return
    b = rows[best]
    print(f"probe_acc={rows['linear probe']['test/acc']:.4f} best_acc={b['test/acc']:.4f} "
          f"best_recipe={best.replace(' ', '_')} ece_before={b['test/ece']:.4f} ece_after={b['test/ece_calibrated']:.4f}")


if __name__ == "__main__":
    main()
