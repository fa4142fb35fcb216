"""Messy image folders: unreadable files are skipped, counted and named; odd but valid images train;
bad set-ups and bad numbers are one line; the user's folder is never touched."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from finetune.cli.train import build, train
from finetune.data.file_checks import FileChecks, check_image
from finetune.data.shapes import write_image_folder

SMALL = ["model.weights=null", "callbacks.rich_progress_bar=null", "data.num_workers=0",
         "data.image_size=32", "data.resize_size=32", "data.batch_size=16"]


def _jpeg_bytes(size=(64, 48), color=(200, 30, 30), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def write_bad(path: Path, kind: str) -> Path:
    """One unreadable file of `kind` at `path` (the suffix is kept as the name says: .jpg/.png)."""
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    elif kind == "truncated":
        path.write_bytes(_jpeg_bytes((256, 256))[:600])
    elif kind == "html":
        path.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    elif kind == "bomb":  # 90 M pixels, over Pillow's 89.5 M limit; a few kB as a 1-bit PNG
        Image.new("1", (10_000, 9_000)).save(path.with_suffix(".png"), optimize=True)
        path = path.with_suffix(".png")
    else:
        raise ValueError(kind)
    return path


BAD_KINDS = {
    "zero_bytes": "empty file",
    "corrupt": "",
    "truncated": "truncated",
    "html": "not an image",
    "bomb": "limit",
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def folder_listing(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_the_check_finds_each_kind_of_unreadable_file(tmp_path, kind):
    path = write_bad(tmp_path / "bad.jpg", kind)
    reason = check_image(str(path))
    assert reason is not None and BAD_KINDS[kind] in reason.lower(), reason
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes())
    assert check_image(str(good)) is None


def test_check_results_are_remembered_for_unchanged_files(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 3}, size=16)
    bad = write_bad(root / "train" / "circle" / "bad.jpg", "html")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    memo = tmp_path / "memo"
    assert FileChecks(root, memo).unreadable(files) == {str(bad): check_image(str(bad))}
    stored = json.loads(next(memo.iterdir()).read_text())
    assert set(stored["files"]) == set(files)
    # A second run trusts the memo for unchanged files: a memo entry edited by hand shows it.
    stored["files"][files[0]][2] = "remembered"
    next(memo.iterdir()).write_text(json.dumps(stored))
    assert FileChecks(root, memo).unreadable(files)[files[0]] == "remembered"
    # A changed file is checked again.
    bad.write_bytes(_jpeg_bytes())
    os.utime(bad, ns=(1, 1))
    again = FileChecks(root, memo).unreadable(files)
    assert str(bad) not in again


def _messy_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Shapes (4 classes x 24 train / 8 test) plus unreadable files: three in train, two in test."""
    root = write_image_folder(tmp_path / "messy", {"train": 24, "test": 8}, size=32)
    placed = {
        "zero_bytes": root / "train" / "circle" / "empty.jpg",
        "html": root / "train" / "square" / "page.jpg",
        "truncated": root / "train" / "cross" / "cut.jpg",
        "corrupt": root / "test" / "circle" / "noise.jpg",
        "bomb": root / "test" / "triangle" / "huge.png",
    }
    return root, {kind: str(write_bad(path, kind)) for kind, path in placed.items()}


@pytest.mark.slow  # end-to-end CLI run
def test_a_run_on_a_messy_folder_skips_names_and_trains_on_the_rest(tmp_path):
    root, bad = _messy_folder(tmp_path)
    before = folder_listing(root)
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "data=folder", f"data.root={root}", *SMALL, "trainer.max_epochs=2",
                     "data.max_bad_fraction=0.1", "data.num_workers=1", f"hydra.run.dir={run_dir}",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["path"]: row["split"] for row in rows} == {
        bad["zero_bytes"]: "train", bad["html"]: "train", bad["truncated"]: "train",
        bad["corrupt"]: "test", bad["bomb"]: "test",
    }
    for row in rows:
        kind = next(k for k, p in bad.items() if p == row["path"])
        assert row["reason"] and BAD_KINDS[kind] in row["reason"].lower(), row
    log = (run_dir / "train.log").read_text()
    for kind, path in bad.items():
        assert path in log, f"the warning does not name the {kind} file"
    assert "train: skipped 3 of 99 files" in log and "test: skipped 2 of 34 files" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # It trained on the rest: the 96 readable train images less the seeded 10% for val (10), in
    # full batches of 16 (80 an epoch); every readable test image, not the 2 unreadable ones.
    assert (metrics["last_epoch/train/images"], metrics["val/images"], metrics["test/images"]) == (80, 10, 32)
    assert all(np.isfinite(metrics[k]) for k in ("last_epoch/train/loss_epoch", "val/loss", "test/loss"))
    assert folder_listing(root) == before  # nothing in the user's folder changed


@pytest.mark.slow
def test_too_many_unreadable_files_stop_before_training(tmp_path):
    root, _ = _messy_folder(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "data=folder", f"data.root={root}", *SMALL, f"hydra.run.dir={run_dir}",
                     timeout=300)  # default data.max_bad_fraction=0.01: 3 of 99 is over it
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "train split" in lines[0] and "3 of 99" in lines[0] and "skipped.csv" in lines[0]
    assert "data.max_bad_fraction" in lines[0]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    # data.max_bad_fraction=1.0 accepts any number (checked by the run above at 0.05).


def test_a_file_that_turns_bad_after_the_check_does_not_kill_the_epoch(make_cfg, tmp_path):
    """Decoding fails in a real loader worker process; the sample is replaced and recorded."""
    root = write_image_folder(tmp_path / "data", {"train": 8, "test": 4}, size=32)
    cfg = make_cfg(["data=folder", f"data.root={root}", *SMALL, "data.num_workers=1",
                    "data.max_bad_fraction=1.0"])
    datamodule, _, _ = build(cfg)
    datamodule.setup("fit")
    victim = root / "train" / "circle" / "0003.png"
    victim.write_bytes(b"now garbage")
    n = len(datamodule.datasets["train"])
    seen = sum(len(targets) for _, targets in datamodule.train_dataloader())
    assert seen == n // 16 * 16  # full batches (drop_last): the bad sample was replaced, not lost
    rows = read_csv(tmp_path / "skipped.csv")
    assert [(r["split"], r["path"]) for r in rows] == [("train", str(victim))]
    # Evaluation drops the sample instead: no image counts twice.
    victim_test = root / "test" / "square" / "0001.png"
    victim_test.write_bytes(b"")
    seen_test = sum(len(targets) for _, targets in datamodule.test_dataloader())
    assert seen_test == len(datamodule.datasets["test"]) - 1


@pytest.mark.parametrize("cache", ["data.cache=true", "finetune=frozen"])
@pytest.mark.slow  # trains once per case
def test_unreadable_files_are_skipped_with_the_resized_copy_and_the_feature_cache(make_cfg, tmp_path, cache):
    root = write_image_folder(tmp_path / "data", {"train": 12, "test": 4}, size=64)
    bad = write_bad(root / "train" / "cross" / "bad.jpg", "truncated")
    extra = ["data.augment=false"] if cache == "finetune=frozen" else ["data.resize_size=40"]
    cfg = make_cfg(["data=folder", f"data.root={root}", *SMALL, cache, *extra, "trainer.max_epochs=1",
                    "data.max_bad_fraction=0.1", "logger=csv"])
    metrics = train(cfg)
    rows = read_csv(tmp_path / "skipped.csv")
    assert [r["path"] for r in rows] == [str(bad)]
    assert metrics["test/images"] == 16


# --- odd but valid images ----------------------------------------------------------------------
def _unusual(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, :20] = (220, 40, 40)
    files = {}
    files["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"], "JPEG")
    files["16bit"] = folder / "sixteen.png"
    Image.fromarray((np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)).save(files["16bit"])
    files["grey"] = folder / "grey.png"
    Image.fromarray(rgb).convert("L").save(files["grey"])
    files["palette"] = folder / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(files["palette"])
    files["rgba"] = folder / "rgba.png"
    Image.fromarray(rgb).convert("RGBA").save(files["rgba"])
    files["exif"] = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((20, 60, 3), np.uint8) + 128).save(files["exif"], "JPEG", exif=exif)
    files["tiny"] = folder / "tiny.png"
    Image.fromarray(rgb[:2, :2]).save(files["tiny"])
    files["elongated"] = folder / "long.png"
    Image.fromarray(np.tile(rgb[:4], (1, 20, 1))).save(files["elongated"])
    files["non_ascii"] = folder / "čaj_图片_ü.jpg"
    Image.fromarray(rgb).save(files["non_ascii"], "JPEG")
    return files


UNUSUAL = ["cmyk", "16bit", "grey", "palette", "rgba", "exif", "tiny", "elongated", "non_ascii"]


@pytest.mark.parametrize("kind", UNUSUAL)
def test_an_unusual_but_valid_image_passes_the_check_and_decodes_as_rgb(tmp_path, kind):
    from finetune.data.decode import load_rgb

    path = _unusual(tmp_path)[kind]
    assert check_image(str(path)) is None, kind
    image = load_rgb(str(path))
    assert image.mode == "RGB"
    values = np.asarray(image)
    if kind == "16bit":  # scaled to 8 bits, not clipped to white
        assert values[..., 0].min() < 10 and values[..., 0].max() > 245 and 100 < values.mean() < 155
    elif kind == "exif":
        assert image.size == (20, 60)  # the orientation tag was applied
    elif kind in ("cmyk", "palette", "rgba", "non_ascii"):  # the red half stays red
        assert values[:, :10, 0].mean() > 150 and values[:, :10, 1].mean() < 90
    elif kind == "grey":
        assert (values[..., 0] == values[..., 1]).all() and values.max() > 50


@pytest.mark.slow  # end-to-end CLI run
def test_unusual_but_valid_images_train(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 6, "test": 2}, size=32)
    for split in ("train", "test"):
        _unusual(root / split / "circle")
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "data=folder", f"data.root={root}", *SMALL, "trainer.max_epochs=1",
                     f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / "skipped.csv").exists() or len((run_dir / "skipped.csv").read_text().splitlines()) <= 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/images"] == 4 * 2 + 9
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))


# --- one-line errors ---------------------------------------------------------------------------
BAD_NUMBERS = {
    "data.batch_size=0": "data.batch_size=0",
    "model.optimizer.lr=0": "model.optimizer.lr=0",
    "model.optimizer.lr=-0.1": "model.optimizer.lr=-0.1",
    "trainer.max_epochs=0": "trainer.max_epochs=0",
    "data.val_fraction=1.5": "data.val_fraction=1.5",
    "data.val_fraction=0": "data.val_fraction=0",
    "data.max_bad_fraction=2": "data.max_bad_fraction=2",
}


@pytest.mark.parametrize("override", list(BAD_NUMBERS))
@pytest.mark.slow  # one CLI process per case
def test_nonsensical_numbers_are_one_line_naming_the_key_and_the_range(override, tmp_path):
    result = run_cli("train.py", "data=shapes", *SMALL, override, f"hydra.run.dir={tmp_path / 'run'}",
                     timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and BAD_NUMBERS[override] in lines[0] and "use " in lines[0], result.stderr[-2000:]


@pytest.mark.slow
def test_an_image_size_the_backbone_cannot_take_is_one_line(tmp_path):
    result = run_cli("train.py", "data=shapes", "model.name=vit_b_16", "model.weights=null",
                     "data.image_size=48", "data.resize_size=48", f"hydra.run.dir={tmp_path / 'run'}",
                     timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "data.image_size=48" in lines[0] and "use one of 224" in lines[0], lines


def _one_class(root: Path) -> None:
    for split in ("train", "test"):
        for cls in ("cross", "square", "triangle"):
            for f in (root / split / cls).iterdir():
                f.unlink()
            (root / split / cls).rmdir()


def _all_test_unreadable(root: Path) -> None:
    for f in (root / "test").rglob("*.png"):
        f.write_bytes(b"")


@pytest.mark.parametrize("mutate,expected", [
    (_one_class, "at least two classes"),
    (_all_test_unreadable, "no readable image"),
])
@pytest.mark.slow  # one CLI process per case
def test_invalid_setups_are_one_line(tmp_path, mutate, expected):
    root = write_image_folder(tmp_path / "data", {"train": 4, "test": 2}, size=16)
    mutate(root)
    result = run_cli("train.py", "data=folder", f"data.root={root}", *SMALL, "data.max_bad_fraction=1.0",
                     f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


@pytest.mark.slow
def test_under_ddp_each_unreadable_file_is_listed_once_and_each_test_image_counted_once(tmp_path):
    root, bad = _messy_folder(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "trainer=ddp_cpu", "data=folder", f"data.root={root}", *SMALL,
                     "trainer.max_epochs=1", "trainer.precision=32-true", "data.max_bad_fraction=0.1",
                     f"hydra.run.dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(run_dir / "skipped.csv")
    assert sorted(r["path"] for r in rows) == sorted(bad.values())  # rank 1 wrote no second copy
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/images"] == 32  # 16 + 16 over the two ranks, none repeated
