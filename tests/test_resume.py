"""A run killed with SIGKILL mid-epoch and resumed from last.ckpt ends exactly as the run left alone.

Real `python train.py` processes on generated shapes, deterministic on the CPU: the killed run's
last.ckpt is a mid-epoch one (`callbacks.last_checkpoint.every_n_train_steps`), and the run
resumed from it (`ckpt_path=`, in the same run dir) must reproduce the final metrics of the
uninterrupted run bit for bit. That needs the RNG
states (crops, flips, dropout), the train loader's position and shuffle order, and, with loader
workers, the workers' RNGs, all saved in the checkpoint and restored. Each test runs two or three
training processes (about a minute on two shared cores), hence `slow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

STEPS_PER_EPOCH = 8  # 64 training images in batches of 8
EVERY = 3  # mid-epoch last.ckpt at steps 3 and 6 of each epoch; the epoch's end writes it at 8

TINY = [
    "data=shapes", "data.train_size=64", "data.val_size=16", "data.test_size=16",
    "data.native_size=32", "data.image_size=32", "data.resize_size=32", "data.batch_size=8",
    "model.name=timm:test_resnet", "model.weights=null", "model.head_dropout=0.5",
    "trainer.max_epochs=2", "trainer.deterministic=true", "trainer.precision=32-true",
    "logger=csv", "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null",
    "callbacks.top_losses=null", f"callbacks.last_checkpoint.every_n_train_steps={EVERY}",
]


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}",
            f"paths.data_dir={run_dir.parent / 'data'}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _run(run_dir: Path, *extra: str) -> dict[str, float]:
    """A whole run in its own process; its final metrics."""
    result = subprocess.run(_command(run_dir, *extra), cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def _kill_after_first_checkpoint(run_dir: Path, *extra: str) -> int:
    """Start a run, SIGKILL it as soon as its first last.ckpt (step EVERY) appears; its global step.

    Lightning writes checkpoints to a temp name and renames them into place, so the file that
    appears is complete.
    """
    last = _last(run_dir)
    run_dir.mkdir(parents=True)
    with open(run_dir / "killed.log", "w") as log:
        process = subprocess.Popen(_command(run_dir, *extra), cwd=ROOT, env=_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not last.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, (run_dir / "killed.log").read_text()[-3000:]
    assert not (run_dir / "metrics.json").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert "combined_loader" in ckpt["loops"]["fit_loop"]["state_dict"]  # the loader's position
    return ckpt["global_step"]


def _last(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def _resume(run_dir: Path, *extra: str) -> dict[str, float]:
    """Continue the run in `run_dir` from its last.ckpt, in the same dir (so the best-checkpoint
    callback keeps its best so far); `resume=never`: the explicit ckpt_path says where from."""
    return _run(run_dir, *extra, f"ckpt_path={_last(run_dir)}", "resume=never")


def _assert_same_run(resumed: dict[str, float], alone: dict[str, float]) -> None:
    # Not val/acc_best: the model's MaxMetric is not in the checkpoint, so after an end-of-epoch
    # resume it forgets the epochs before (the best checkpoint, tested here, does not).
    for key in ("test/acc", "test/loss", "val/loss", "val/acc", "last_epoch/val/loss", "last_epoch/val/acc",
                "last_epoch/train/loss_epoch"):
        assert resumed[key] == alone[key], (key, resumed, alone)


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict[str, float]:
    """The uninterrupted run's final metrics, loading in the main process."""
    return _run(tmp_path_factory.mktemp("alone") / "run", "data.num_workers=0")


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_same_metrics(alone, tmp_path):
    run_dir = tmp_path / "run"
    step = _kill_after_first_checkpoint(run_dir, "data.num_workers=0")
    assert step % STEPS_PER_EPOCH != 0, f"last.ckpt at step {step} is not mid-epoch"
    _assert_same_run(_resume(run_dir, "data.num_workers=0"), alone)
    last = torch.load(_last(run_dir), map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_resuming_from_an_end_of_epoch_checkpoint_reproduces_the_next_epochs(alone, tmp_path):
    """The epoch after the checkpoint shuffles and augments as it would have: the loader's
    generator and the RNGs are restored at the epoch boundary too."""
    run_dir = tmp_path / "run"
    _run(run_dir, "data.num_workers=0", "trainer.max_epochs=1", "test=false")
    _assert_same_run(_resume(run_dir, "data.num_workers=0"), alone)


@pytest.mark.slow
def test_with_loader_workers_a_killed_run_resumes_to_the_same_metrics(tmp_path):
    """Augmentations drawn in a worker process: the worker's RNGs come back with the checkpoint."""
    workers = ["data.num_workers=1", "data.persistent_workers=true"]
    alone = _run(tmp_path / "alone", *workers)
    run_dir = tmp_path / "run"
    step = _kill_after_first_checkpoint(run_dir, *workers)
    assert step % STEPS_PER_EPOCH != 0, f"last.ckpt at step {step} is not mid-epoch"
    _assert_same_run(_resume(run_dir, *workers), alone)


def _trained_lrs(ckpt_path: Path) -> tuple[float, list[float]]:
    """(the checkpoint's configured lr, each param group's lr / lr_mult as the optimizer trained)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    return ckpt["hyper_parameters"]["optimizer"]["lr"], [g["lr"] / g.get("lr_mult", 1.0) for g in groups]


@pytest.mark.slow  # two training runs and a search
def test_tune_lr_is_not_rerun_on_resume_and_says_so(make_cfg, tmp_path, capsys, caplog):
    """The resumed optimizer keeps the rate it was restored with; a second search would only claim
    to apply its suggestion (and write it into the checkpoints' hparams) while training at the old one."""
    from finetune.cli.train import train

    fast = [o for o in TINY if not o.startswith(("trainer.max_epochs", "callbacks.last_checkpoint"))]
    common = [*fast, "test=false", "tune_lr=true", "lr_finder.num_training=20",
              "data.train_size=32"]
    train(make_cfg([*common, "trainer.max_epochs=1"]))
    assert "lr finder: suggested learning rate" in capsys.readouterr().out
    last = tmp_path / "checkpoints" / "last.ckpt"
    tuned, trained = _trained_lrs(last)
    assert trained == pytest.approx([tuned] * len(trained))

    caplog.set_level("INFO", logger="finetune")
    resumed = tmp_path / "resumed.ckpt"
    last.rename(resumed)
    train(make_cfg([*common, "trainer.max_epochs=2"]), ckpt_path=resumed)
    assert "lr finder" not in capsys.readouterr().out
    assert "tune_lr=true: the learning-rate finder is not run on resume" in caplog.text
    assert _trained_lrs(last) == (tuned, pytest.approx([tuned] * len(trained)))
