"""Real training on generated data, the run directory it leaves, and one-line errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from finetune.cli.train import build, train
from finetune.data.shapes import write_image_folder

SMALL = ["model.weights=null", "callbacks.rich_progress_bar=null", "data.num_workers=0",
         "data.image_size=32", "data.resize_size=32"]


def test_training_on_an_image_folder_sizes_the_head_and_records_the_classes(make_cfg, tmp_path):
    root = write_image_folder(tmp_path / "folder", {"train": 12, "test": 4}, size=32,
                              classes=["circle", "cross", "triangle"])
    cfg = make_cfg(["data=folder", f"data.root={root}", *SMALL, "data.batch_size=8", "trainer.max_epochs=2"])
    datamodule, model, _ = build(cfg)
    assert datamodule.classes == ["circle", "cross", "triangle"]
    assert model.head[-1].out_features == 3
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(n.startswith("epoch_") for n in checkpoints)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["class_names"] == ["circle", "cross", "triangle"]
    assert ckpt["hyper_parameters"]["preprocessing"]["crop_size"] == 32
    assert ckpt["state_dict"]["head.1.weight"].shape == (3, 512)


@pytest.mark.slow  # trains, then resumes
def test_a_run_resumes_from_its_last_checkpoint(make_cfg, tmp_path):
    tiny = ["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", *SMALL,
            "data.batch_size=16", "logger=csv", "test=false", "callbacks=default",
            "callbacks.rich_progress_bar=null"]
    last = tmp_path / "checkpoints" / "last.ckpt"
    first = train(make_cfg(tiny + ["trainer.max_epochs=1"]))
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["val_acc_best"] == pytest.approx(first["val/acc_best"])
    # A resumed run's val/acc_best starts from the saved best, so it is the whole run's.
    _, fresh, _ = build(make_cfg(tiny))
    fresh.on_load_checkpoint(saved)
    assert float(fresh.val_acc_best.compute()) == pytest.approx(first["val/acc_best"])
    second = train(make_cfg(tiny + ["trainer.max_epochs=2", f"ckpt_path={last}"]))
    assert second["val/acc_best"] >= first["val/acc_best"]
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    # The second run's own log holds only the epoch it added, not a fresh start.
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = {row.split(",")[header.index("epoch")] for row in rows[1:]}
    # Rows without an epoch are the run's once-only figures (fit time, parameter counts).
    assert epochs - {""} == {"1"}
    assert "time/fit_s" in header


def test_last_checkpoint_is_the_latest_epoch_even_without_improvement(make_cfg, tmp_path):
    """A frozen backbone (BatchNorm statistics included) and lr=1e-30 (0 is refused as a user
    error): nothing can change in float32, so val/acc never improves after epoch 0 and only
    epoch_000.ckpt is a best checkpoint."""
    cfg = make_cfg(["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", *SMALL,
                    "data.batch_size=16", "logger=csv", "test=false", "trainer.max_epochs=3",
                    "finetune=frozen", "model.optimizer.lr=1e-30"])
    _, _, trainer = build(cfg)
    assert trainer.checkpoint_callback.monitor == "val/acc"  # train() tests the best one
    train(cfg)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)


@pytest.mark.slow
def test_quickstart_learns_the_shapes_and_leaves_a_complete_run_dir(tmp_path):
    """The README's first training command, as a user runs it: >= 90% test accuracy offline."""
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "experiment=quickstart", f"hydra.run.dir={run_dir}",
                     f"paths.data_dir={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    test_acc = [line for line in result.stdout.splitlines() if "test/acc" in line][-1]
    assert float(test_acc.split()[-2]) >= 0.90, result.stdout[-2000:]


def _folder_with(tmp_path: Path, mutate) -> Path:
    root = write_image_folder(tmp_path / "bad", {"train": 2, "test": 2}, size=16)
    mutate(root)
    return root


def _empty_class(root: Path) -> None:
    for f in (root / "train" / "cross").iterdir():
        f.unlink()


def _no_classes(root: Path) -> None:
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    (root / "train" / "notes.txt").write_text("no folders here")


def _differ(root: Path) -> None:
    (root / "test" / "square").rename(root / "test" / "box")


BAD_INPUT = {
    "missing data.root": (["data=folder"], "data.root"),
    "root not a folder": (["data=folder", "data.root=/nonexistent/photos"], "/nonexistent/photos"),
    "no class folders": ("no_classes", "has no class subfolders"),
    "empty class folder": ("empty_class", "cross holds no images"),
    "class sets differ": ("differ", "only in train: ['square']; only in test: ['box']"),
    "unknown model": (["model.name=resnet19"], "unknown model.name=resnet19"),
    "unknown weights": (["model.name=resnet50", "model.weights=IMAGENET1K_V9"], "model.weights=IMAGENET1K_V9"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
@pytest.mark.slow  # one CLI process per case
def test_bad_input_is_one_clear_line(case, tmp_path):
    args, expected = BAD_INPUT[case]
    if isinstance(args, str):
        mutate = {"no_classes": _no_classes, "empty_class": _empty_class, "differ": _differ}[args]
        args = ["data=folder", f"data.root={_folder_with(tmp_path, mutate)}"]
    result = run_cli("train.py", *args, "model.weights=null" if case != "unknown weights" else "seed=1",
                     f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
