"""Outputs that cannot be written are one line naming the path, never a traceback, and the last
good checkpoint survives a save that fails. Real faults: a path whose folder is a regular file
(ENOTDIR/EEXIST even for root, who ignores permission bits) and a file-size limit set in the
child process (`RLIMIT_FSIZE`: the kernel's EFBIG, as a full disk gives ENOSPC)."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from finetune.data.shapes import write_image_folder
from finetune.errors import FinetuneError

TINY = ["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.native_size=32",
        "data.image_size=32", "data.resize_size=32", "data.batch_size=8", "model.name=timm:test_resnet",
        "model.weights=null", "trainer.precision=32-true", "logger=csv", "callbacks.rich_progress_bar=null",
        "callbacks.prediction_grid=null", "callbacks.top_losses=null", "callbacks.confusion_matrix=null"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    result = run_cli("train.py", *TINY, "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run_dir}",
                     f"paths.data_dir={run_dir.parent / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def test_a_path_under_a_regular_file_is_one_line_naming_it(tmp_path):
    from finetune.output_errors import check_writable

    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    with pytest.raises(FinetuneError) as info:
        check_writable(blocker / "deep" / "predictions.csv")
    assert str(info.value) == (f"cannot write {blocker / 'deep' / 'predictions.csv'} ({blocker} is a file, not a "
                               "folder); choose a writable path")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["predict.py", "export.py"])
def test_predict_and_export_to_an_unwritable_path_are_one_line(script, run, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    output = blocker / ("predictions.csv" if script == "predict.py" else "model.pt")
    images = write_image_folder(tmp_path / "images", {"test": 1}, size=32)
    extra = [f"input={images}"] if script == "predict.py" else ["format=torchscript"]
    line = one_error_line(run_cli(script, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"output={output}",
                                  *extra, f"hydra.run.dir={tmp_path / 'out'}"))
    assert f"cannot write {output} ({blocker} is a file, not a folder)" in line, line
    assert blocker.read_text() == "a file, not a folder"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_checkpoint_save_past_the_file_size_limit_is_one_line_and_keeps_the_last_good_one(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = _digest(last)
    limit = last.stat().st_size // 2
    assert limit > 64 * 1024  # room for the logs and configs the run writes first

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"resume={run_dir}", "trainer.max_epochs=2"],
                            cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=small_files,
                            capture_output=True, text=True, timeout=600, check=False)
    line = one_error_line(result)
    assert f"cannot write {run_dir / 'checkpoints'}" in line and "File too large" in line, line
    assert "it needs about" in line and "free there" in line, line
    assert _digest(last) == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
