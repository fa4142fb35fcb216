"""Options are checked before work starts: one line before the first step, not after the fit."""

from __future__ import annotations

import pytest

from conftest import run_cli
from finetune.cli.train import train
from finetune.config_checks import check_numbers
from finetune.errors import FinetuneError

TINY = ["data=shapes", "data.train_size=16", "data.val_size=8", "data.test_size=8", "data.native_size=32",
        "data.image_size=32", "data.resize_size=32", "data.batch_size=8", "model.name=timm:test_resnet",
        "model.weights=null", "trainer.max_epochs=1", "trainer.precision=32-true", "logger=csv",
        "callbacks.rich_progress_bar=null"]

BEFORE_TRAINING = {
    "unknown tta": (["tta=vflip"], "tta=vflip is not one of"),
    "calibrate without validation batches": (["+trainer.limit_val_batches=0"],
                                             "calibrate=true fits the temperature on the validation batches"),
    "calibrate without a validation epoch": (["trainer.check_val_every_n_epoch=3"],
                                             "trainer.check_val_every_n_epoch=3 > trainer.max_epochs=1"),
}


@pytest.mark.parametrize("case", BEFORE_TRAINING)
def test_a_bad_option_stops_the_run_before_its_first_step(case, make_cfg, tmp_path):
    overrides, expected = BEFORE_TRAINING[case]
    with pytest.raises(FinetuneError) as info:
        train(make_cfg([*TINY, *overrides]))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.rglob("metrics.csv"))


def test_calibrate_false_trains_without_validation_batches(make_cfg, tmp_path):
    train(make_cfg([*TINY, "+trainer.limit_val_batches=0", "calibrate=false", "test=false"]))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(("override", "expected"), [
    ("model.optimizer.lr='1e-3'", "model.optimizer.lr='1e-3' is a string, not a number (quoted: write model"),
    ("data.batch_size='32'", "data.batch_size='32' is a string, not a number (quoted: write data.batch_size=32"),
    ("data.val_fraction=a_tenth", "data.val_fraction='a_tenth' is a string, not a number; use a fraction"),
])
def test_a_string_where_a_number_belongs_is_called_a_string(override, expected, make_cfg):
    with pytest.raises(FinetuneError) as info:
        check_numbers(make_cfg([override]))
    assert str(info.value).startswith(expected)


@pytest.mark.slow
def test_the_command_line_reports_an_unknown_tta_in_one_line_before_training(tmp_path):
    result = run_cli("train.py", *TINY, "tta=vflip", f"hydra.run.dir={tmp_path}", timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "tta=vflip" in line
    assert not (tmp_path / "checkpoints").exists()
