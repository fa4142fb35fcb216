"""Transfer recipes side by side on real photos: accuracy, calibration and wall time.

    python benchmarks/recipes.py                      # the 900-photo scale, CIFAR-10 photos from ../shared
    python benchmarks/recipes.py --scale 4500         # the 4,500-photo scale (timm's train.py was measured on it)
    python benchmarks/recipes.py --scale 900 4500     # both; the last line is the largest scale's
    python benchmarks/recipes.py --scale smoke        # seconds: generated shapes or 4+2 photos per class

Every recipe runs the product (`finetune.cli.train.train`: fit, then test the checkpoint chosen by
val/acc) on the same train/val/test split, the same packaged ImageNet EfficientNet-Lite0, seed and
resolution. Only the strategy and its regularisation differ.

Choices are made on validation, never on test: each run's checkpoint by `val/acc`, and the best
recipe by the validation accuracy of its chosen checkpoint. The validation split has at least 500
photos (one photo is 0.2 points; the standard error of an accuracy near 80% is about 1.8 points),
taken from the training photos with the data's seed. Test: the first 200 test photos of each
class (2,000; standard error about 0.9 points), by sorted file name.

- 900: the first 140 photos of each class by file name; 500 of the 1,400 are validation, 900 train.
- 4500: the first 450 photos of each class; 500 of them are validation, 4,000 train.

Each row reports the test accuracy of the checkpoint chosen by validation and of the last epoch
(`last.ckpt`, tested the same way), ECE before and after the temperature (15 bins, top label) and
the wall time of fit + test. Last line (for the largest scale run):
`probe_acc= best_acc= best_recipe= ece_before= ece_after= scale=`.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import time
from pathlib import Path

from _common import CIFAR_TARBALL, ROOT, product_config, scratch_dir
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from linear_probe import extract_subset
from omegaconf import open_dict

from finetune.cli.evaluate import evaluate
from finetune.cli.train import train
from finetune.data.shapes import write_image_folder

SCALES = {  # photos per class: (train + validation pool, test), and validation photos in all
    "smoke": (4, 2, 8),
    "900": (140, 200, 500),
    "4500": (450, 200, 500),
}
# What each recipe adds to the common settings. The probe and LP-FT's first stage run on cached
# features; the fine-tuning rows train on images with the default schedule (warmup + cosine).
PROBE = ["experiment=offline_transfer", "trainer.max_epochs={probe_epochs}", "model.optimizer.lr={probe_lr}"]
SCHEDULE = ["+model.scheduler._target_=finetune.finetuning.WarmupCosine", "+model.scheduler._partial_=true",
            "+model.scheduler.warmup_fraction=0.1"]
FINETUNE = ["experiment=offline_transfer", "model.optimizer._target_=torch.optim.AdamW",
            "model.optimizer.weight_decay=0.05", "data.augment=true", "data.crop_scale=[0.5,1.0]",
            "trainer.max_epochs={epochs}", *SCHEDULE]
# The default recipe as shipped: its schedule sized from the data (finetune.finetuning.sizing).
LP_FT = ["experiment=offline_finetune", "finetune.callback.lp_epochs={probe_epochs}", "model.optimizer.lr={probe_lr}",
         "sizing.finetune_steps={lp_ft_steps}"]
RECIPES: dict[str, list[str]] = {
    "linear probe": PROBE,
    "full fine-tune": [*FINETUNE, "finetune=full", "model.head_lr_mult=10", "model.optimizer.lr={lr}"],
    "gradual": [*FINETUNE, "finetune=gradual", "finetune.callback.unfreeze_at_epoch=1",
                "finetune.callback.backbone_lr_mult=0.1", "model.optimizer.lr={probe_lr}"],
    "LP-FT (offline_finetune)": LP_FT,
    "LP-FT, BatchNorm trained": [*LP_FT, "finetune.bn=train"],
}


def eval_last(run_dir: Path, data: list[str], common_eval: list[str]) -> float:
    """Test accuracy of the run's last epoch (`last.ckpt`), on the same test split."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "data=folder",
                                                     *data, *common_eval], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(run_dir / "eval_last")
    return evaluate(cfg)["test/acc"]


def run(recipe: list[str], common: list[str], data: list[str], values: dict, out_dir: Path,
        common_eval: list[str]) -> dict[str, float]:
    cfg = product_config([o.format(**values) for o in recipe] + data + common, out_dir)
    start = time.perf_counter()
    metrics = train(cfg)
    metrics["wall_s"] = time.perf_counter() - start
    metrics["test_last/acc"] = eval_last(out_dir, data, common_eval)
    return metrics


def best_recipe(rows: dict[str, dict[str, float]]) -> str | None:
    """The best fine-tuning recipe by the validation accuracy of its chosen checkpoint, never by
    test (a choice made on test reports a test accuracy biased upward by the choosing)."""
    return max((n for n in rows if n != "linear probe"), key=lambda n: rows[n]["val/acc_best"], default=None)


def se(acc: float, n: int) -> float:
    return math.sqrt(max(acc * (1 - acc), 1e-9) / max(n, 1))


def scale_data(scale: str, args: argparse.Namespace, work: Path) -> tuple[Path, float, str, int]:
    """(ImageFolder root, val_fraction, description, test images)."""
    pool, test, n_val = SCALES[scale]
    if args.archive.is_file():
        root = extract_subset(args.archive, work / f"cifar-{scale}", {"train": pool, "test": test})
        what = f"CIFAR-10 photos: first {pool} train + {test} test per class ({n_val} of the {10 * pool} for val)"
        return root, n_val / (10 * pool), what, 10 * test
    print(f"no {args.archive}: generated shapes, where every recipe reaches 100% (accuracies say nothing)")
    root = write_image_folder(work / f"shapes-{scale}", {"train": pool, "test": test}, size=64)
    return root, n_val / (4 * pool), "generated shapes", 4 * test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=CIFAR_TARBALL, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--scale", nargs="+", default=["900"], choices=list(SCALES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train-image-size", type=int, default=None,
                        help="data.train_image_size for the fine-tuning rows (FixRes; eval stays at --image-size)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs on images for the full and gradual rows "
                        "(LP-FT, the shipped recipe, sizes its own from the data: finetune.finetuning.sizing)")
    parser.add_argument("--probe-epochs", type=int, default=10, help="epochs of the probe on cached features")
    parser.add_argument("--lr", type=float, default=1e-4, help="the backbone's fine-tuning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--trainer", default="cpu", help="the trainer= config group: cpu, gpu")
    parser.add_argument("--only", nargs="*", help="run only these recipes (names as in the table)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every recipe")
    args = parser.parse_args()
    # The product's own lines (the recipe's plan, the unfreeze, the time budget) between the rows.
    logging.basicConfig(format="[finetune] %(message)s")
    logging.getLogger("finetune").setLevel(logging.INFO)

    work = scratch_dir("recipes-")
    common = [
        f"trainer={args.trainer}", f"trainer.precision={args.precision}",
        f"paths.data_dir={work / 'data'}", "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null",
        "callbacks.top_losses=null", "callbacks.confusion_matrix=null", "callbacks.lr_monitor=null", "logger=[]",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", *args.override,
    ]
    common_eval = [f"trainer={args.trainer}", f"trainer.precision={args.precision}", "callbacks=[]", "logger=[]",
                   "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
    values = {"epochs": args.epochs, "probe_epochs": args.probe_epochs, "lr": args.lr, "probe_lr": 10 * args.lr,
              "lp_ft_steps": "auto"}
    if "smoke" in args.scale:
        values.update(epochs=1, probe_epochs=1, lp_ft_steps=1)
    last_line = ""
    for scale in args.scale:
        root, val_fraction, what, n_test = scale_data(scale, args, work)
        data = [f"data.root={root}", f"data.val_fraction={val_fraction:.6f}", f"data.image_size={args.image_size}",
                f"data.resize_size={args.image_size}", f"data.batch_size={args.batch_size}"]
        rows = {}
        for name, recipe in RECIPES.items():
            if args.only and name not in args.only:
                continue
            out = work / f"{scale}-{re.sub('[^A-Za-z0-9]+', '_', name)}"
            fixres = [f"data.train_image_size={args.train_image_size}"] \
                if args.train_image_size and name != "linear probe" else []
            m = run(recipe + fixres, common, data, values, out, common_eval)
            rows[name] = m
            print(f"[{scale}] {name}: val {m['val/acc_best']:.4f}, test {m['test/acc']:.4f} (last epoch "
                  f"{m['test_last/acc']:.4f}), ECE {m['test/ece']:.4f} -> {m['test/ece_calibrated']:.4f}, "
                  f"{m['wall_s']:.0f} s", flush=True)
        n_val = round(val_fraction * (10 if args.archive.is_file() else 4) * SCALES[scale][0])
        trained_at = f" (fine-tuning trains at {args.train_image_size})" if args.train_image_size else ""
        print(f"\nscale {scale}: {what}; {args.image_size} px{trained_at}, precision {args.precision}, batch {args.batch_size}; "
              f"{values['epochs']} epochs on images at lr {args.lr:g} (probe: {values['probe_epochs']} epochs at "
              f"{10 * args.lr:g}); val {n_val} images, test {n_test} images")
        print(f"| {'recipe':<28} | val acc (chosen) | test acc (chosen) | test acc (last epoch) | ECE before "
              f"| ECE after T | wall time |")
        print(f"|{'-' * 30}|-----------------:|------------------:|----------------------:|-----------:|"
              f"------------:|----------:|")
        for name, m in rows.items():
            print(f"| {name:<28} | {m['val/acc_best']:.4f} ± {se(m['val/acc_best'], n_val):.3f} "
                  f"| {m['test/acc']:.4f} ± {se(m['test/acc'], n_test):.3f} | {m['test_last/acc']:20.4f} "
                  f"| {m['test/ece']:10.4f} | {m['test/ece_calibrated']:11.4f} | {m['wall_s']:7.0f} s |")
        best = best_recipe(rows)
        if best is None or "linear probe" not in rows:
            continue
        b = rows[best]
        last_line = (f"probe_acc={rows['linear probe']['test/acc']:.4f} best_acc={b['test/acc']:.4f} "
                     f"best_recipe={best.split(' (')[0].replace(' ', '_').replace(',', '')} "
                     f"ece_before={b['test/ece']:.4f} ece_after={b['test/ece_calibrated']:.4f} scale={scale}")
        print(last_line, flush=True)
    if last_line:
        print(last_line)


if __name__ == "__main__":
    main()
