"""Reloading a checkpoint: a file that is not one of ours is one line; a bug in our code is not."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from conftest import compose_train, run_cli
from finetune.cli.train import train
from finetune.errors import FinetuneError, find_user_error
from finetune.models import ImageClassifier
from finetune.models.checkpoint import HINT, load_classifier

SMALL = ["model.weights=null", "callbacks.rich_progress_bar=null", "data.num_workers=0",
         "data.image_size=32", "data.resize_size=32", "data.batch_size=16", "trainer.precision=32-true",
         "logger=csv", "test=false", "trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def trained(shapes_folder, tmp_path_factory) -> Path:
    """`last.ckpt` of a real one-epoch run on the shapes folder."""
    out = tmp_path_factory.mktemp("checkpoint_run")
    train(compose_train(["data=folder", f"data.root={shapes_folder}", *SMALL], out_dir=out))
    return out / "checkpoints" / "last.ckpt"


def test_a_checkpoint_written_by_train_loads_with_its_weights(trained):
    model = load_classifier(trained)
    saved = torch.load(trained, map_location="cpu", weights_only=False)["state_dict"]
    assert not model.training and model.class_names == ["circle", "cross", "square", "triangle"]
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def _truncated(good: Path, bad: Path) -> None:
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _plain_state_dict(good: Path, bad: Path) -> None:
    torch.save(torch.load(good, map_location="cpu", weights_only=False)["state_dict"], bad)


def _another_modules_checkpoint(good: Path, bad: Path) -> None:
    """A Lightning checkpoint whose module had other hyperparameters (e.g. a detector's)."""
    ckpt = torch.load(good, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"] = {"lr": 0.1, "hidden": 64}
    torch.save(ckpt, bad)


def _another_modules_weights(good: Path, bad: Path) -> None:
    ckpt = torch.load(good, map_location="cpu", weights_only=False)
    ckpt["state_dict"] = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, bad)


def _zip_of_something_else(good: Path, bad: Path) -> None:
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


BAD_FILES = {
    "empty": lambda good, bad: bad.write_bytes(b""),
    "text": lambda good, bad: bad.write_text("epoch=3 acc=0.9\n"),
    "truncated": _truncated,
    "zip of something else": _zip_of_something_else,
    "plain state dict": _plain_state_dict,
    "another module's checkpoint": _another_modules_checkpoint,
    "another module's weights": _another_modules_weights,
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_file_that_is_not_our_checkpoint_is_one_user_error(trained, tmp_path, kind):
    bad = tmp_path / "bad.ckpt"
    BAD_FILES[kind](trained, bad)
    with pytest.raises(FinetuneError) as info:
        load_classifier(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and HINT in message
    assert "is not a readable finetune checkpoint" in message


def test_a_missing_or_unset_checkpoint_is_one_user_error(tmp_path):
    with pytest.raises(FinetuneError, match="not found"):
        load_classifier(tmp_path / "missing.ckpt")
    with pytest.raises(FinetuneError, match="ckpt_path is not set"):
        load_classifier(None)


@pytest.mark.slow
def test_eval_on_a_truncated_checkpoint_prints_one_line_and_exits_2(trained, tmp_path, shapes_folder):
    bad = tmp_path / "bad.ckpt"
    _truncated(trained, bad)
    result = run_cli("eval.py", f"ckpt_path={bad}", "data=folder", f"data.root={shapes_folder}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(bad) in line and "ckpt_path=" in line


@pytest.mark.parametrize("error", [TypeError, RuntimeError, KeyError, AttributeError])
def test_a_bug_in_the_model_code_keeps_its_traceback(trained, monkeypatch, error):
    """The same exceptions a damaged file can cause, raised by our code: not a user error."""
    def broken_init(self, *args, **kwargs):
        raise error("a bug in ImageClassifier.__init__")

    monkeypatch.setattr(ImageClassifier, "__init__", broken_init)
    with pytest.raises(error, match="a bug in ImageClassifier") as info:
        load_classifier(trained)
    assert find_user_error(info.value) is None
