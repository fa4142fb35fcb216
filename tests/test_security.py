"""A checkpoint is data, not a program: every entry point reads it with torch's weights-only
unpickler, and a file whose pickle would run code is refused in one line before it runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier
from finetune.run.checkpoint_io import AtomicCheckpointIO

TINY = ["data=shapes", "data.train_size=32", "data.val_size=16", "data.test_size=16", "data.native_size=32",
        "data.image_size=32", "data.resize_size=32", "data.batch_size=8", "model.name=timm:test_resnet",
        "model.weights=null", "trainer.max_epochs=1", "trainer.precision=32-true", "logger=csv",
        "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null", "callbacks.top_losses=null"]
# What else goes into a checkpoint: a scheduler's state, EMA weights, mid-epoch loop state.
RICH = ["callbacks=[default,ema]", "callbacks.ema.decay=0.5",
        "+model.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,_partial_:true,T_max:2}",
        "callbacks.last_checkpoint.every_n_train_steps=1", "callbacks.rich_progress_bar=null",
        "callbacks.prediction_grid=null", "callbacks.top_losses=null"]


class WritesMarker:
    """A pickle payload: unpickling it calls `exec`, which writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The run dir of a real (tiny) `train.py` run, with the scheduler, EMA and mid-epoch saves."""
    run_dir = tmp_path_factory.mktemp("secure") / "run"
    result = run_cli("train.py", *TINY, *RICH, f"hydra.run.dir={run_dir}", f"paths.data_dir={run_dir.parent / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def evil_copy(good: Path, bad: Path, marker: Path) -> Path:
    """`good` with a code-running object among its hyperparameters; checks the payload is live."""
    checkpoint = torch.load(good, map_location="cpu", weights_only=False)  # the test's own run
    checkpoint["hyper_parameters"]["head_dropout"] = WritesMarker(marker)
    torch.save(checkpoint, bad)
    probe = marker.with_name("probe")
    torch.save(WritesMarker(probe), marker.with_name("probe.pt"))
    torch.load(marker.with_name("probe.pt"), weights_only=False)
    assert probe.read_text() == "ran"  # the payload does run under the full unpickler
    return bad


def test_every_checkpoint_a_run_writes_loads_with_the_weights_only_unpickler(run):
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in checkpoints} >= {"last.ckpt"} and len(checkpoints) == 2
    for path in checkpoints:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        hparams = checkpoint["hyper_parameters"]
        assert hparams["optimizer"] == {"_target_": "torch.optim.adam.Adam", "_partial_": True, "lr": 1e-3,
                                        "weight_decay": 0.0}
        assert hparams["scheduler"]["_target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
        assert checkpoint["lr_schedulers"] and checkpoint["optimizer_states"]
    model = load_classifier(run / "checkpoints" / "last.ckpt")
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam)


def test_a_code_running_checkpoint_is_refused_by_the_loaders(run, tmp_path):
    marker = tmp_path / "marker"
    bad = evil_copy(run / "checkpoints" / "last.ckpt", tmp_path / "bad.ckpt", marker)
    with pytest.raises(FinetuneError) as info:
        load_classifier(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "builtins.exec" in message
    with pytest.raises(FinetuneError, match="builtins.exec"):
        AtomicCheckpointIO().load_checkpoint(bad)  # Lightning's resume and test(ckpt_path=) read through it
    assert not marker.exists()


def test_an_old_checkpoint_names_the_global_and_loads_only_when_trusted(run, tmp_path, caplog):
    """Before this change the hparams held Hydra's partials: refused, unless trust_checkpoint=true."""
    from functools import partial

    old = tmp_path / "old.ckpt"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"] = partial(torch.optim.Adam, lr=1e-3)
    torch.save(checkpoint, old)
    with pytest.raises(FinetuneError, match="functools.partial.*trust_checkpoint=true"):
        load_classifier(old)
    model = load_classifier(old, trust=True)
    assert model.hparams.optimizer == {"_target_": "torch.optim.adam.Adam", "_partial_": True, "lr": 1e-3}
    assert "runs any code" in caplog.text


ENTRY_POINTS = {
    "eval": lambda bad, run, out: ("eval.py", f"ckpt_path={bad}", f"hydra.run.dir={out}"),
    "predict": lambda bad, run, out: ("predict.py", f"ckpt_path={bad}", f"input={out.parent}",
                                      f"hydra.run.dir={out}"),
    "export": lambda bad, run, out: ("export.py", f"ckpt_path={bad}", f"hydra.run.dir={out}"),
    "train ckpt_path=": lambda bad, run, out: ("train.py", *TINY, f"ckpt_path={bad}", f"hydra.run.dir={out}",
                                               f"paths.data_dir={run.parent / 'data'}"),
    "train resume=": lambda bad, run, out: ("train.py", f"resume={bad.parent.parent}", "trainer.max_epochs=2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_entry_point_runs_a_checkpoints_code(entry, run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "marker"
    bad = evil_copy(run / "checkpoints" / "last.ckpt", copy / "checkpoints" / "last.ckpt", marker)
    script, *args = ENTRY_POINTS[entry](bad, run, tmp_path / "out")
    result = run_cli(script, *args)
    assert not marker.exists(), f"{entry} ran the checkpoint's code"
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(bad) in line and "builtins.exec" in line, line

