"""Data folders that are not friendly: symlink loops, named pipes among the images, file names
that are not UTF-8. Each is counted right, never hangs, and is written back without a traceback."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hydra
import lightning as L

from conftest import compose_train
from finetune.cli.predict import predict
from finetune.cli.train import build
from finetune.data.file_walk import printable, unprintable
from finetune.data.shapes import write_image_folder

SMALL = ["data=folder", "model.weights=null", "data.num_workers=0", "data.image_size=32",
         "data.resize_size=32", "data.batch_size=8", "data.max_bad_fraction=1.0"]
LATIN1 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not UTF-8


def _datamodule(make_cfg, root: Path, *extra: str):
    cfg = make_cfg([*SMALL, f"data.root={root}", *extra])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule


def test_symlink_loops_count_each_real_image_once_and_say_how_many_links_were_skipped(make_cfg, tmp_path, caplog):
    root = write_image_folder(tmp_path / "data", {"train": 6, "test": 2}, size=16)
    os.symlink("..", root / "train" / "circle" / "parent")  # a loop to train/
    os.symlink("../square", root / "train" / "cross" / "twin")  # a second way to another class's images
    os.symlink("0000.png", root / "test" / "cross" / "again.png")  # a second name for one image
    with caplog.at_level(logging.INFO, logger="finetune"):
        dm = _datamodule(make_cfg, root)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 4 * 6
    assert len(dm.datasets["test"]) == 4 * 2
    assert "skipped 3 links" in caplog.text, caplog.text


def test_a_link_to_a_sibling_class_folder_does_not_relabel_that_class(make_cfg, tmp_path):
    """`train/cross/twin -> ../square`: the walk used to enter `cross/twin` first (depth first, by
    name) and skip the real `square/`, so square's images were listed, and labelled, as cross's."""
    from finetune.data.file_walk import list_images

    root = write_image_folder(tmp_path / "data", {"train": 6, "test": 2}, size=16)
    os.symlink("../square", root / "train" / "cross" / "twin")
    listed = [rel for rel, _, _ in list_images(root)]
    assert sum(rel.startswith("train/square/") for rel in listed) == 6
    assert not any(rel.startswith("train/cross/twin/") for rel in listed), listed
    dm = _datamodule(make_cfg, root)
    labels = [dm.datasets["train"].dataset.classes[t] for t in dm.datasets["train"].dataset.targets]
    assert labels.count("square") == labels.count("cross") == 6


def test_hard_links_and_links_to_files_are_listed_once_each(tmp_path):
    """A folder with no file links is listed without an inode set; one link of either kind sends
    it the careful way, so no image is counted twice."""
    from finetune.data.file_walk import list_images

    root = write_image_folder(tmp_path / "data", {"train": 3}, size=16)
    plain = list_images(root)
    assert len(plain) == 4 * 3
    os.link(root / "train" / "circle" / "0000.png", root / "train" / "cross" / "hard.png")
    assert len(list_images(root)) == len(plain), "a hard link counted twice"
    os.unlink(root / "train" / "cross" / "hard.png")
    os.symlink("../circle/0001.png", root / "train" / "square" / "soft.png")
    assert len(list_images(root)) == len(plain), "a link to a file counted twice"


FIFO_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import hydra
    sys.path.insert(0, sys.argv[2])
    from conftest import compose_train
    from finetune.data.image_files import find_files, model_inputs
    from finetune.data.transforms import Preprocessing
    root = Path(sys.argv[1])
    cfg = compose_train(%r + [f"data.root={root}"], root.parent / "out")
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batches = sum(1 for _ in dm.train_dataloader())
    print("skipped", sorted(dm.datasets["train"].dataset.skipped.values()))
    files = find_files(root / "test")
    items = model_inputs(files, Preprocessing(crop_size=32, resize_size=32))
    reasons = [items[i][2] for i in range(len(items)) if items[i][1] is None]
    print("predict skipped", reasons)
""") % (SMALL,)


def test_a_named_pipe_among_the_images_never_blocks_and_is_reported(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 6, "test": 2}, size=16)
    os.mkfifo(root / "train" / "circle" / "0000a.jpg")  # among the files sampled for their size
    os.mkfifo(root / "test" / "circle" / "pipe.png")
    script = tmp_path / "fifo.py"
    script.write_text(FIFO_SCRIPT)
    # A hang fails the test (the timeout), it does not hang the suite.
    result = subprocess.run([sys.executable, str(script), str(root), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped ['not a regular file (a named pipe (FIFO))" in result.stdout, result.stdout
    assert "predict skipped ['not a regular file (a named pipe (FIFO))" in result.stdout, result.stdout


def test_printable_names_are_utf8_and_give_back_the_exact_name():
    for name in (LATIN1, "plain.jpg", "été.jpg", "back\\slash.jpg", os.fsdecode(b"a\\xe9\xff.jpg")):
        text = printable(name)
        text.encode("utf-8")  # valid UTF-8
        assert unprintable(text) == name
    assert printable(LATIN1) == "caf\\xe9.png"
    assert printable("été.jpg") == "été.jpg"


def _checkpoint(make_cfg, root: Path, tmp_path: Path) -> Path:
    cfg = make_cfg([*SMALL, f"data.root={root}", "trainer.max_epochs=1",
                    "logger=csv", "callbacks=none"])
    datamodule, model, _ = build(cfg)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_latin1_file_names_are_listed_read_and_written_back_escaped(make_cfg, tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 6, "test": 2}, size=16)
    good = root / "train" / "circle" / LATIN1
    os.rename(root / "train" / "circle" / "0000.png", good)
    bad = root / "train" / "square" / os.fsdecode(b"bad\xe9.png")
    bad.write_bytes(b"not a png")
    dm = _datamodule(make_cfg, root, f"data.skipped_csv={tmp_path / 'skipped.csv'}")
    train = dm.datasets["train"].dataset
    assert str(good) in [path for path, _ in train.samples]
    assert train[[path for path, _ in train.samples].index(str(good))][0].shape[0] == 3  # decoded
    with open(tmp_path / "skipped.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [unprintable(r["path"]) for r in rows] == [str(bad)]

    images = tmp_path / "images"
    images.mkdir()
    os.rename(good, images / LATIN1)
    os.rename(bad, images / os.fsdecode(b"bad\xe9.png"))
    ckpt = _checkpoint(make_cfg, root, tmp_path)
    out = tmp_path / "predict"
    predict(compose_train([f"ckpt_path={ckpt}", f"input={images}"], out, config_name="predict"))
    with open(out / "predictions.csv", encoding="utf-8", newline="") as f:
        predicted = [unprintable(r["path"]) for r in csv.DictReader(f)]
    with open(out / "skipped.csv", encoding="utf-8", newline="") as f:
        skipped = [unprintable(r["path"]) for r in csv.DictReader(f)]
    assert predicted == [str(images / LATIN1)]
    assert skipped == [str(images / os.fsdecode(b"bad\xe9.png"))]


# --- start-up that grows in a straight line ------------------------------------------------------
def test_adding_one_file_checks_one_file_and_appends_to_the_memo_instead_of_rewriting_it(tmp_path, caplog):
    from finetune.data.file_checks import FileChecks

    root = write_image_folder(tmp_path / "data", {"train": 10}, size=16)
    files = sorted(str(p) for p in root.rglob("*.png"))
    memo_dir = tmp_path / "memo"
    FileChecks(root, memo_dir).unreadable(files)
    [memo] = [p for p in memo_dir.iterdir() if p.suffix == ".json"]
    before = (memo.stat().st_ino, memo.stat().st_mtime_ns, memo.stat().st_size)
    added = root / "train" / "circle" / "added.png"
    added.write_bytes(Path(files[0]).read_bytes())
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert FileChecks(root, memo_dir).unreadable([*files, str(added)]) == {}
    assert "checking 1 image files" in caplog.text, caplog.text
    assert (memo.stat().st_ino, memo.stat().st_mtime_ns, memo.stat().st_size) == before  # not rewritten
    # ... and what was appended is remembered: a third run checks nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune"):
        FileChecks(root, memo_dir).unreadable([*files, str(added)])
    assert "checking" not in caplog.text


def test_an_unchanged_folder_is_answered_without_the_per_file_memo_and_any_change_is_seen(tmp_path, caplog):
    """A warm start-up of a million files loaded a million-entry memo (6 s, growing faster than N);
    the summary answers an unchanged listing by its digest, and a changed file misses it."""
    from finetune.data.file_checks import FileChecks
    from finetune.data.file_walk import list_images

    root = write_image_folder(tmp_path / "data", {"train": 5}, size=16)
    bad = root / "train" / "circle" / "page.png"
    bad.write_text("<html>not an image</html>")
    memo_dir = tmp_path / "memo"

    def check() -> dict[str, str]:
        listed = list_images(root)
        return FileChecks(root, memo_dir).unreadable([str(root / rel) for rel, _, _ in listed],
                                                     [(size, mtime) for _, size, mtime in listed])

    assert list(check()) == [str(bad)]
    for per_file in [p for p in memo_dir.iterdir() if p.suffix in (".json", ".journal")]:
        per_file.unlink()  # only the summary is left to answer
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert list(check()) == [str(bad)]
    assert "checking" not in caplog.text, caplog.text
    assert f"{len(list_images(root))} image files under {root} unchanged since they were last checked (1 unreadable" in caplog.text
    bad.write_bytes(next((root / "train" / "square").iterdir()).read_bytes())  # now a real image
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert check() == {}
    assert "checking" in caplog.text


def _collections_in_a_warm_start_up(make_cfg, tmp_path: Path, per_class: int) -> tuple[int, int]:
    """(garbage collections, files) while a warm folder is listed, checked and set up."""
    import gc

    from finetune.data.file_checks import FileChecks
    from finetune.data.file_walk import list_images

    root = write_image_folder(tmp_path / f"data{per_class}", {"train": per_class, "test": 2}, size=8)
    memo = tmp_path / f"memo{per_class}"
    cfg = make_cfg(["data=folder", f"data.root={root}", "model.weights=null", f"data.cache_dir={memo}"])
    hydra.utils.instantiate(cfg.data).setup("fit")  # cold: checks every file, writes the memo
    listed = list_images(root)
    files, sizes = [str(root / rel) for rel, _, _ in listed], [(size, mtime) for _, size, mtime in listed]
    checks, datamodule = FileChecks(root, memo), hydra.utils.instantiate(cfg.data)
    runs = []
    gc.callbacks.append(lambda phase, info: runs.append(phase == "start"))
    try:
        list_images(root)
        checks.unreadable(files, sizes)
        datamodule.setup("fit")  # the listing, warm checks and the val split again, as a run does
    finally:
        gc.callbacks.pop()
    assert gc.isenabled()
    return sum(runs), len(files)


def test_a_warm_start_up_runs_as_many_garbage_collections_for_10x_the_files(make_cfg, tmp_path):
    """Each collection walks the whole heap (torch's import alone leaves hundreds of thousands of
    objects); set off every few hundred records, they made the per-file cost grow with N."""
    few, n_few = _collections_in_a_warm_start_up(make_cfg, tmp_path, 60)
    many, n_many = _collections_in_a_warm_start_up(make_cfg, tmp_path, 600)
    assert n_many >= 10 * n_few - 100
    assert many <= few + 2, f"{few} collections for {n_few} files, {many} for {n_many}"


def test_long_stages_log_their_progress_when_the_output_is_not_a_terminal(caplog):
    from finetune.data.progress import Progress

    with caplog.at_level(logging.INFO, logger="finetune"), \
            Progress("checking image files", total=300, interval=0.0) as progress:
        for _ in range(3):
            progress.advance(100)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checking image files")]
    assert lines and "300/300" in lines[-1] and "/s" in lines[-1], lines
