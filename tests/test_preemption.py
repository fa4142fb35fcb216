"""Runs that survive preemption, tried with real processes and real signals: resume by run dir,
re-running a finished run, a SLURM requeue (a fake `scontrol` on PATH), a sweep killed mid-way."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_cli
from finetune.run.resume import prepare_argv

# 32 train images in batches of 8: 4 steps an epoch, each logged (train/loss_step, lr-*).
TINY = ["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16",
        "data.image_size=32", "data.resize_size=32", "data.num_workers=0", "data.batch_size=8",
        "model.weights=null", "trainer.precision=32-true", "callbacks.rich_progress_bar=null",
        "callbacks.prediction_grid=null", "callbacks.top_losses=null", "trainer.log_every_n_steps=1"]
STEPS_PER_EPOCH = 4


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _scalar_steps(run_dir: Path, version: str = "") -> dict[str, list[int]]:
    """Each scalar's steps as TensorBoard shows them (stale events purged)."""
    events = EventAccumulator(str(run_dir / "tensorboard" / version))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_one_clean_tensorboard_run(run_dir: Path, epochs: int, every_step: bool = True, version: str = "") -> None:
    """One TensorBoard run (no version subdirs) whose per-step curve has each step once, and every
    step when the run stopped on an epoch boundary."""
    assert [p.name for p in (run_dir / "tensorboard" / version).iterdir() if p.is_dir()] == []
    steps = _scalar_steps(run_dir, version)
    if every_step:
        assert steps["train/loss_step"] == list(range(epochs * STEPS_PER_EPOCH)), steps["train/loss_step"]
        assert len(steps["val/acc"]) == epochs, steps["val/acc"]
    for tag, seen in steps.items():
        if tag != "epoch":  # Lightning logs `epoch` with both the train and the val metrics of a step
            assert seen == sorted(set(seen)), (tag, seen)
    assert len(steps["train/loss_epoch"]) == epochs and steps["train/loss_epoch"][-1] == steps["test/acc"][0] - 1


def _popen(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_by_run_dir_adds_an_epoch_in_the_same_dir_and_tensorboard_run(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli("train.py", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns

    # The same command again: the run finished, so nothing is trained and the command succeeds.
    again = run_cli("train.py", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout + again.stderr
    assert last.stat().st_mtime_ns == written

    # Another command in that dir is refused before Hydra rewrites the dir's saved config.
    other = run_cli("train.py", *TINY, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} holds another run")
    assert "trainer.max_epochs=1" in other.stderr and "resume=" in other.stderr
    assert "trainer.max_epochs=1" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())

    # resume=RUN_DIR alone brings back the run's own overrides (its data sizes, batch size ...).
    resumed = run_cli("train.py", f"resume={run_dir}", "trainer.max_epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} from {last}" in resumed.stdout + resumed.stderr
    ckpt = _checkpoint(last)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 2 * STEPS_PER_EPOCH)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["run"]  # no new run dir
    assert "trainer.max_epochs=2" in (run_dir / "run.json").read_text()
    _assert_one_clean_tensorboard_run(run_dir, epochs=2)


def test_resume_needs_a_run_dir_with_a_checkpoint(tmp_path):
    result = run_cli("train.py", f"resume={tmp_path / 'nowhere'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: resume={tmp_path / 'nowhere'}: no run there")


def _fake_slurm(tmp_path: Path, job_id: str) -> tuple[dict, Path]:
    """SLURM's batch-job environment and an `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    return env, calls


@pytest.mark.slow
def test_slurm_signal_saves_requeues_and_the_requeued_job_finishes_the_run_in_the_same_dir(tmp_path):
    env, calls = _fake_slurm(tmp_path, "4242")
    args = [*TINY, "trainer.max_epochs=4"]
    run_dir = tmp_path / "outputs" / "slurm" / "4242"
    job = _popen(args, cwd=tmp_path, env=env)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", job)  # epoch 0 is done: training
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=USR1@90` sends before the time limit
    output = job.communicate(timeout=240)[0]
    assert calls.read_text().split() == ["requeue", "4242"], output[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and not (run_dir / "metrics.json").exists(), output[-3000:]
    stopped_at = _checkpoint(hpc)["global_step"]
    assert stopped_at < 4 * STEPS_PER_EPOCH

    requeued = run_cli("train.py", *args, cwd=tmp_path, env=env)  # SLURM runs the same script again
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming {run_dir} from {hpc}" in requeued.stdout + requeued.stderr
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["slurm"]
    assert [p.name for p in (tmp_path / "outputs" / "slurm").iterdir()] == ["4242"]
    ckpt = _checkpoint(run_dir / "checkpoints" / "last.ckpt")
    # It stopped at the end of a training batch, where the loader's saved position is exact: the
    # requeued job trains every remaining batch once (stopping after Lightning had fetched the next
    # batch would skip it, and one step would be missing).
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 4 * STEPS_PER_EPOCH
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] >= 0.0
    _assert_one_clean_tensorboard_run(run_dir, epochs=4)


@pytest.mark.slow
def test_a_sweep_killed_mid_way_and_rerun_skips_resumes_and_starts_its_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, "callbacks.confusion_matrix=null", "trainer.max_epochs=3", "seed=1,2,3",
            f"hydra.sweep.dir={sweep_dir}"]
    sweep = _popen(args, cwd=tmp_path)
    _wait_for(sweep_dir / "1" / "checkpoints" / "last.ckpt", sweep)  # job 0 done, job 1 in epoch 1
    sweep.kill()
    sweep.wait()
    assert (sweep_dir / "0" / "metrics.json").is_file()
    assert not (sweep_dir / "1" / "metrics.json").exists() and not (sweep_dir / "2").exists()
    job0_ckpt = (sweep_dir / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    job0_metrics = (sweep_dir / "0" / "metrics.json").read_text()

    rerun = run_cli("train.py", *args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "already finished" in log and f"resuming {sweep_dir / '1'} from" in log
    assert (sweep_dir / "0" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == job0_ckpt
    assert (sweep_dir / "0" / "metrics.json").read_text() == job0_metrics
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        ("0", "completed", "seed=1"), ("1", "completed", "seed=2"), ("2", "completed", "seed=3")]
    for job in ("1", "2"):
        ckpt = _checkpoint(sweep_dir / job / "checkpoints" / "last.ckpt")
        assert (ckpt["epoch"], ckpt["global_step"]) == (2, 3 * STEPS_PER_EPOCH)
        _assert_one_clean_tensorboard_run(sweep_dir / job, epochs=3, version=f"seed={int(job) + 1}")  # its overrides


@pytest.mark.slow  # two sweeps
def test_a_resumed_optuna_study_does_not_reuse_a_finished_trials_dir(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep_dir = tmp_path / "sweep"
    search = ["hparams_search=optuna", *TINY[:9], "debug=fast", "callbacks=none", "hydra.sweeper.n_trials=1",
              f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=tiny", f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli("train.py", *search, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    trial0 = (sweep_dir / "0" / "run.json").read_text()

    # The study goes on (another sampler seed, or TPE would draw trial 0's values again); Hydra
    # numbers the new trial 0 again.
    second = run_cli("train.py", *search, "hydra.sweeper.sampler.seed=7", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (sweep_dir / "0" / "run.json").read_text() == trial0
    [new] = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.startswith("0-")]
    assert json.loads((new / "run.json").read_text())["overrides"] != json.loads(trial0)["overrides"]
    with (sweep_dir / "summary.csv").open() as f:
        assert sorted(Path(r["run_dir"]).name for r in csv.DictReader(f)) == ["0", new.name]


def test_prepare_argv_replays_a_run_dirs_overrides_under_the_command_lines(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"overrides": ["model=resnet34", "trainer.max_epochs=2", "seed=3"], "finished": False}))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "loops": {}}, tmp_path / "checkpoints" / "last.ckpt")
    argv = prepare_argv(["train.py", f"resume={tmp_path}", "trainer.max_epochs=5", "-cn", "train"], environ={})
    assert argv == ["train.py", "-cn", "train", "model=resnet34", "seed=3", "trainer.max_epochs=5",
                    f"resume={tmp_path}", f"hydra.run.dir={tmp_path}"]
    assert prepare_argv(argv, environ={}) == argv  # a DDP child re-running it gets the same


@pytest.mark.parametrize(("environ", "run_dir"), [
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train"}, "${paths.log_dir}/slurm/77"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3",
      "SLURM_JOB_NAME": "train"}, "${paths.log_dir}/slurm/70_3"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "79", "SLURM_JOB_NAME": "interactive"}, None),  # salloc/srun --pty
    ({}, None),
])
def test_a_slurm_batch_job_runs_in_a_dir_named_after_the_job(environ, run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a known run dir is locked (finetune.run.run_lock): "mine" goes here
    argv = prepare_argv(["train.py", "seed=1"], environ=environ)
    assert argv == ["train.py", "seed=1"] + ([f"hydra.run.dir={run_dir}"] if run_dir else [])
    assert prepare_argv(["train.py", "hydra.run.dir=mine"], environ=environ) == ["train.py", "hydra.run.dir=mine"]
