"""DDP on CPU (2 processes, gloo), multiruns with their summary, and the Optuna sweep: all run
as a user would, on tiny generated data."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import hydra
import lightning as L
import optuna
import pytest
import yaml

from conftest import run_cli
from finetune.data.preprocessing import decide_for
from finetune.models import ImageClassifier
from finetune.run.distributed import one_job_argv

# 64/32/33 images of 32px; 33 test images do not split evenly over 2 ranks.
TINY = ["data=shapes", "data.train_size=64", "data.val_size=32", "data.test_size=33",
        "data.image_size=32", "data.resize_size=32", "data.num_workers=0", "model.weights=null",
        "trainer.precision=32-true"]
# Sweeps of one-batch jobs: checkpoints and TensorBoard views would only cost time.
FAST = [*TINY, "debug=fast", "callbacks=none"]


def _summary(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # DDP
def test_ddp_on_two_cpu_processes_keeps_one_run_and_tests_the_best_checkpoint(tmp_path, make_cfg):
    # Best by `epoch`, lowest first: the best checkpoint is epoch 0, not the final weights.
    result = run_cli("train.py", "trainer=ddp_cpu", *TINY, "callbacks.rich_progress_bar=null",
                     "trainer.max_epochs=2",
                     "model.optimizer.lr=0.01", "callbacks.model_checkpoint.monitor=epoch",
                     "callbacks.model_checkpoint.mode=min", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [".hydra", "checkpoints", "tensorboard"]
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1, events  # one writer (pid)
    log = (run_dir / "train.log").read_text()
    assert log.count("classes: ") == 1, log  # rank 1 does not write to the run's log

    best = run_dir / "checkpoints" / "epoch_000.ckpt"
    assert f"Restoring states from the checkpoint path at {best}" in result.stdout + result.stderr
    ddp_acc = json.loads((run_dir / "metrics.json").read_text())["test/acc"]

    # The same checkpoint, evaluated by one process, gives the same accuracy: every test image
    # counted once across the two ranks (none repeated to even them out).
    cfg = make_cfg(TINY)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = ImageClassifier.load_from_checkpoint(best, map_location="cpu", weights_only=False)
    decide_for(datamodule, model.preprocessing)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    single_acc = trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]
    assert ddp_acc == pytest.approx(single_acc, abs=1e-6)


@pytest.mark.slow  # DDP sweep
def test_ddp_jobs_of_a_sweep_each_run_once_in_their_own_dir(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train.py", "-m", "trainer=ddp_cpu", *FAST, "seed=1,2",
                     f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "outputs").exists()  # no child started a sweep or a run of its own
    assert result.stdout.count("Launching 2 jobs locally") == 1
    assert [r["status"] for r in _summary(sweep_dir)] == ["completed", "completed"]


@pytest.mark.slow  # sweep
def test_a_2x2_multirun_writes_one_row_per_job_and_failures_do_not_stop_the_others(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # Two jobs at a time (joblib): records come from worker processes, the table from this one.
    result = run_cli("train.py", "-m", "hydra/launcher=parallel", *FAST,
                     "model.name=not_a_model,resnet18", "model.optimizer.lr=0.1,0.01",
                     f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode != 0  # the sweep reports that some of its jobs failed ...
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    rows = _summary(sweep_dir)  # ... after every job ran, failed first or not
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "failed"), ("1", "failed"), ("2", "completed"), ("3", "completed")]
    assert rows[0]["overrides"] == "model.name=not_a_model model.optimizer.lr=0.1"
    assert "unknown model.name=not_a_model" in rows[0]["error"]
    assert rows[0]["test/acc"] == ""
    for row in rows[2:]:
        assert 0.0 <= float(row["test/acc"]) <= 1.0 and row["val/acc_best"]
        assert Path(row["run_dir"]) == sweep_dir / row["job"]
    md = (sweep_dir / "summary.md").read_text().splitlines()
    assert md[0].startswith("| job | status | overrides |") and len(md) == 2 + 4
    assert "sweep summary" in result.stdout and "failed" in result.stdout


@pytest.mark.slow  # sweep
def test_optuna_search_runs_trials_offline_and_resumes_from_its_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = ["hparams_search=optuna", *FAST, f"hydra.sweeper.storage={storage}",
              "hydra.sweeper.study_name=tiny"]
    sweep_dir = tmp_path / "first"
    result = run_cli("train.py", *search, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _summary(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for key in ("model.optimizer.lr=", "model.head_lr_mult=", "model.optimizer.weight_decay=",
                "data.batch_size="):
        assert all(key in r["overrides"] for r in rows), rows
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(float(r["val/acc_best"]) for r in rows)

    # A second search with the same storage and study name carries on from the first.
    result = run_cli("train.py", *search, "hydra.sweeper.n_trials=1",
                     f"hydra.sweep.dir={tmp_path / 'second'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_a_ddp_child_reruns_only_its_own_job():
    argv = ["train.py", "-m", "--config-name", "train", "-cd=/extra", "model=resnet18,resnet50",
            "model.optimizer.lr=1e-3,1e-4"]
    task = ["model=resnet50", "model.optimizer.lr=1e-4"]
    hydra_overrides = ["hydra.sweep.dir=/s", "hydra.mode=MULTIRUN", "hydra/launcher=parallel",
                       "hydra.verbose=true"]
    assert one_job_argv(argv, task, hydra_overrides) == [
        "train.py", "--config-name", "train", "-cd=/extra", "model=resnet50",
        "model.optimizer.lr=1e-4", "hydra.verbose=true", "hydra.mode=RUN"]


@pytest.mark.slow  # sweep through the CLI
def test_the_slurm_launcher_writes_a_multi_node_sbatch_script(tmp_path):
    # No cluster here: stand-ins for srun and sbatch refuse, leaving the script that would go out.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("sbatch", "srun"):
        (fake_bin / tool).write_text("#!/bin/sh\necho 'no cluster (dry run)' >&2\nexit 1\n")
        (fake_bin / tool).chmod(0o755)
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                     "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                     "model=resnet18,resnet50", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
                     env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert "no cluster (dry run)" in result.stderr
    [script] = (sweep_dir / ".submitit").glob(".submission_file_*.sh")
    text = script.read_text()
    for line in ("--array=0-1", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                 "--partition=gpu", "--job-name=train"):
        assert f"#SBATCH {line}" in text, text
    assert "srun" in text and "submitit.core._submit" in text


def test_the_launcher_and_search_configs_compose(make_cfg):
    cfg = make_cfg(["hparams_search=optuna"])
    assert cfg.optimized_metric == "val/acc_best" and cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"model.optimizer.lr", "model.head_lr_mult",
                                             "model.optimizer.weight_decay", "data.batch_size"}
    cfg = make_cfg(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (2, 4)
    assert make_cfg(["hydra/launcher=parallel"]).hydra.launcher.n_jobs == 2
    assert make_cfg(["trainer=ddp_cpu"]).trainer.strategy == "ddp"


@pytest.mark.slow  # DDP
def test_ddp_with_fewer_validation_images_than_processes_is_refused_before_training(tmp_path):
    """With 1 validation image on 2 ranks, rank 1 has no validation batch: the calibration's and
    the metrics' gathers would wait for it forever. One line before training instead, and a hang
    fails the test (the whole process group is killed at the timeout) rather than hanging it."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *TINY, "data.val_size=1",
               "callbacks.rich_progress_bar=null", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    with subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as process:
        try:
            _, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail("train.py with a 1-image validation split under DDP hung (killed after 240 s)")
    assert process.returncode == 2, stderr[-3000:]
    errors = {line for line in stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, stderr[-3000:]  # the same line from each rank
    assert "the val split has 1 image for 2 processes" in errors.pop()
    assert "Traceback" not in stderr
    assert not (run_dir / "checkpoints").exists()  # refused before training
