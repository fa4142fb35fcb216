"""The package works installed, not only from a checkout: configs ship inside the wheel, the
console scripts find them through `pkg://finetune.conf`, runs write under the current directory,
and users add their own config folders with `--config-dir`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from configparser import ConfigParser
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import NETWORK_GUARD, ROOT, run_cli

# A user's own configs, kept outside the package: a data option built on ours and an experiment
# that composes our groups with it. Every value differs from the defaults, so each is observable.
USER_DATA = """\
defaults:
  - shapes          # ours (conf/data/shapes.yaml)
  - _self_
train_size: 96
val_size: 32
test_size: 32
image_size: 32
resize_size: 32
"""
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /data: tiny_shapes    # the user's own file, next to ours
  - override /model: resnet18      # ours
tags: [my_experiment]
seed: 7
model:
  weights: null
trainer:
  max_epochs: 1
callbacks:
  rich_progress_bar: null
"""


def write_user_configs(folder: Path) -> Path:
    """A user config dir: experiment/my_experiment.yaml and data/tiny_shapes.yaml."""
    (folder / "experiment").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "experiment" / "my_experiment.yaml").write_text(USER_EXPERIMENT)
    (folder / "data" / "tiny_shapes.yaml").write_text(USER_DATA)
    return folder


def assert_user_values(cfg) -> None:
    """The composed config holds the user's files' values on top of ours."""
    assert cfg.tags == ["my_experiment"] and cfg.seed == 7
    assert cfg.data._target_ == "finetune.data.ShapesDataModule"  # from our shapes.yaml
    assert (cfg.data.train_size, cfg.data.image_size) == (96, 32)  # from the user's tiny_shapes.yaml
    assert cfg.model.name == "resnet18" and cfg.trainer.max_epochs == 1


def build_wheel(out: Path) -> Path:
    """Build the wheel from a copy of the checkout (symlinks kept as links), as `pip install .` does."""
    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out / "dist")],
                   check=True, capture_output=True, text=True, timeout=300)
    return next((out / "dist").glob("finetune-*.whl"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_ships_every_config_once(wheel):
    """Every YAML under conf/ is package data of finetune.conf, read from the one copy in git."""
    shipped = sorted(n.removeprefix("finetune/conf/") for n in zipfile.ZipFile(wheel).namelist()
                     if n.startswith("finetune/conf/") and n.endswith(".yaml"))
    ours = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert shipped == ours
    assert (ROOT / "src" / "finetune" / "conf").resolve() == (ROOT / "conf").resolve()


def console_scripts(wheel: Path) -> list[str]:
    """The commands the wheel installs (pyproject [project.scripts])."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        entry_points = ConfigParser()
        entry_points.read_string(archive.read(name).decode())
    return list(entry_points["console_scripts"])


def test_user_config_dir_composes_with_ours(tmp_path):
    """`--config-dir DIR`: the user's experiment and data files compose with our groups."""
    user = write_user_configs(tmp_path / "my_configs")
    result = run_cli("train.py", "--config-dir", str(user), "experiment=my_experiment",
                     "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_user_values(OmegaConf.create(result.stdout))


def venv_env(venv: Path) -> dict[str, str]:
    """The venv's scripts first on PATH; no PYTHONPATH into the checkout (only the network guard)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(NETWORK_GUARD), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def install_into_venv(wheel: Path, venv: Path) -> dict[str, str]:
    """A fresh venv that reuses the installed torch etc., with only the wheel's copy of finetune."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, capture_output=True, timeout=300)
    env = venv_env(venv)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, env=env, timeout=300)
    return env


def run_installed(script: str, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"{script} {' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def only_run_dir(work: Path, task_name: str, tag: str | None = None) -> Path:
    """The one run dir under work/outputs (the current directory's) of this task and tag."""
    runs = [p.parent.parent for p in (work / "outputs").glob("*/*/.hydra/config.yaml")
            if (cfg := OmegaConf.load(p)).task_name == task_name and (tag is None or tag in cfg.tags)]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_installed_wheel_trains_and_evaluates_from_any_directory(wheel, tmp_path):
    """`pip install .` (not editable) into a fresh venv; every console script runs from a temp dir,
    finds the shipped configs and the user's, and writes under that dir only."""
    venv = tmp_path / "venv"
    env = install_into_venv(wheel, venv)
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import finetune; print(finetune.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"the venv imports {where}, not the wheel's copy"
    for script in console_scripts(wheel):  # each one composes its config from pkg://finetune.conf
        run_installed(str(venv / "bin" / script), "--help", cwd=work, env=env)

    run_installed(str(venv / "bin" / "finetune-train"), "experiment=quickstart", "debug=fast",
                  cwd=work, env=env)
    quick = only_run_dir(work, "train", "quickstart")
    assert (quick / "metrics.json").exists() and list((quick / "tensorboard").glob("events.out.*"))

    # fast_dev_run saves no checkpoint: the user's one-epoch experiment makes the one to evaluate.
    user = write_user_configs(tmp_path / "my_configs")
    run_installed(str(venv / "bin" / "finetune-train"), "--config-dir", str(user),
                  "experiment=my_experiment", cwd=work, env=env)
    mine = only_run_dir(work, "train", "my_experiment")
    assert_user_values(OmegaConf.load(mine / ".hydra" / "config.yaml"))
    best = next((mine / "checkpoints").glob("epoch_*.ckpt"))
    result = run_installed(str(venv / "bin" / "finetune-eval"), f"ckpt_path={best}", cwd=work, env=env)
    assert "test/acc" in result.stdout
    evaluated = only_run_dir(work, "eval")
    assert (evaluated / "per_class.csv").exists()
    assert not list(venv.rglob("outputs")), "nothing is written inside the installed package"
