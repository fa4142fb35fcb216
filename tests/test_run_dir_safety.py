"""A run touches only what is its own: `resume=` refuses dirs that are not our runs before writing
anything, one process trains in a run dir at a time, and a damaged record or checkpoint is one
line (or, for a damaged last checkpoint, a resume from the newest readable one), never a loss."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from finetune.errors import FinetuneError
from finetune.run.resume import prepare_argv

TINY = ["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.native_size=32",
        "data.image_size=32", "data.resize_size=32", "data.batch_size=8", "model.name=timm:test_resnet",
        "model.weights=null", "trainer.precision=32-true", "logger=csv", "callbacks.rich_progress_bar=null",
        "callbacks.prediction_grid=null", "callbacks.top_losses=null", "callbacks.confusion_matrix=null"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with a digest of its bytes (folders: 'dir')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-epoch run: run.json, .hydra/, checkpoints/epoch_*.ckpt and last.ckpt."""
    run_dir = tmp_path_factory.mktemp("ours") / "run"
    result = run_cli("train.py", *TINY, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
                     f"paths.data_dir={run_dir.parent / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _another_tools_run(folder: Path, ours: Path) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("model:\n  lr: 0.1\n")
    (folder / ".hydra" / "hydra.yaml").write_text("hydra:\n  run:\n    dir: .\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- model.lr=0.1\n")
    (folder / "main.log").write_text("[INFO] epoch 3 done\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(os.urandom(256))


def _copy_without(name: str):
    def make(folder: Path, ours: Path) -> None:
        shutil.copytree(ours, folder)
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return make


FOREIGN = {
    "another tool's hydra run": (_another_tools_run, "not a finetune run"),
    "a copy without run.json": (_copy_without("run.json"), "not a finetune run"),
    "a copy without checkpoints": (_copy_without("checkpoints"), "has no checkpoint to continue from"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FOREIGN)
def test_resume_into_a_dir_that_is_not_our_run_is_refused_before_anything_is_written(case, finished_run, tmp_path):
    make, expected = FOREIGN[case]
    foreign = tmp_path / "foreign"
    make(foreign, finished_run)
    before = snapshot(foreign)
    with pytest.raises(FinetuneError) as info:
        prepare_argv(["train.py", f"resume={foreign}", "trainer.max_epochs=3"], environ={})
    assert "\n" not in str(info.value) and str(foreign) in str(info.value) and expected in str(info.value)
    assert snapshot(foreign) == before


@pytest.mark.slow
def test_the_command_line_leaves_another_tools_run_byte_for_byte_alone(finished_run, tmp_path):
    foreign = tmp_path / "foreign"
    _another_tools_run(foreign, finished_run)
    before = snapshot(foreign)
    line = one_error_line(run_cli("train.py", f"resume={foreign}", "trainer.max_epochs=3", cwd=tmp_path, timeout=300))
    assert str(foreign) in line and "not a finetune run" in line, line
    assert snapshot(foreign) == before


DAMAGED_RECORDS = {"garbage": b"\x00\x01garbage{", "truncated": b'{"overrides": ["seed=1"', "wrong shape": b"[1, 2]",
                   "overrides not a list": b'{"overrides": "seed=1", "finished": false}'}


@pytest.mark.parametrize("damage", DAMAGED_RECORDS)
def test_a_damaged_run_record_is_refused_before_hydra_writes(damage, tmp_path):
    """prepare_argv runs before Hydra writes anything into the dir."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "run.json").write_bytes(DAMAGED_RECORDS[damage])
    before = snapshot(tmp_path)
    for argv in (["train.py", f"resume={tmp_path}"], ["train.py", "seed=1", f"hydra.run.dir={tmp_path}"]):
        with pytest.raises(FinetuneError) as info:
            prepare_argv(argv, environ={})
        message = str(info.value)
        assert "\n" not in message and f"{tmp_path / 'run.json'} is damaged" in message
        assert f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}" in message
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_damaged_run_record_is_one_line_and_the_run_dir_is_unchanged(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "run.json").write_bytes(DAMAGED_RECORDS["garbage"])
    before = snapshot(run_dir)
    line = one_error_line(run_cli("train.py", f"resume={run_dir}", cwd=tmp_path, timeout=300))
    assert f"{run_dir / 'run.json'} is damaged" in line and "ckpt_path=" in line, line
    assert snapshot(run_dir) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_a_truncated_last_checkpoint_resumes_from_the_newest_readable_one(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    (best,) = run_dir.glob("checkpoints/epoch_*.ckpt")
    _truncate(last)
    result = run_cli("train.py", f"resume={run_dir}", "trainer.max_epochs=3", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    (warning,) = [line for line in log.splitlines() if "unreadable" in line]
    assert str(last) in warning and f"resuming from {best}" in warning, warning
    assert json.loads((run_dir / "run.json").read_text())["finished"] is True


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_line_and_every_file_is_kept(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for checkpoint in run_dir.glob("checkpoints/*.ckpt"):
        _truncate(checkpoint)
    before = snapshot(run_dir)
    line = one_error_line(run_cli("train.py", f"resume={run_dir}", "trainer.max_epochs=3", cwd=tmp_path,
                                  timeout=300))
    assert "has no readable checkpoint" in line and "last.ckpt (truncated" in line, line
    assert snapshot(run_dir) == before


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "data.train_size=512", f"hydra.run.dir={run_dir}",
               f"paths.data_dir={run_dir.parent / 'data'}", *extra]
    return subprocess.Popen(command, cwd=run_dir.parent, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(run_dir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    lock = run_dir / ".finetune.lock"
    deadline = time.monotonic() + timeout
    while not (lock.is_file() and lock.read_text().strip() == str(process.pid)
               and (run_dir / "run.json").is_file()):
        assert process.poll() is None, process.stderr.read()[-3000:]  # it ended: its stderr is complete
        assert time.monotonic() < deadline, f"no lock held by pid {process.pid} in {run_dir}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_process_in_a_run_dir_refuses_and_a_killed_ones_lock_is_gone(tmp_path):
    run_dir = tmp_path / "run"
    first = _start(run_dir, "trainer.max_epochs=50")
    try:
        _wait_for_lock(run_dir, first)
        second = run_cli("train.py", *TINY, "data.train_size=512", f"hydra.run.dir={run_dir}",
                         f"paths.data_dir={run_dir.parent / 'data'}", "trainer.max_epochs=50", cwd=tmp_path,
                         timeout=240)
        line = one_error_line(second)
        assert f"{run_dir} is in use by another training process (pid {first.pid})" in line, line
        assert first.poll() is None  # the first one trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # SIGKILL left no stale lock: the next process takes the dir (here afresh, one epoch).
    third = run_cli("train.py", *TINY, f"hydra.run.dir={run_dir}", f"paths.data_dir={run_dir.parent / 'data'}",
                    "trainer.max_epochs=1", "resume=never", "test=false", cwd=tmp_path, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert (run_dir / ".finetune.lock").read_text().strip() != str(first.pid)


def test_a_damaged_checkpoint_given_as_ckpt_path_is_one_line_before_training(make_cfg, tmp_path):
    from finetune.cli.train import train

    bad = tmp_path / "given.ckpt"
    bad.write_bytes(b"PK\x03\x04 the first bytes of a zip, then nothing")
    with pytest.raises(FinetuneError) as info:
        train(make_cfg([*TINY, "trainer.max_epochs=1", f"ckpt_path={bad}"]))
    assert str(info.value).startswith(f"ckpt_path={bad} cannot be resumed from (truncated, or not a checkpoint)")
    assert not (tmp_path / "checkpoints").exists()
