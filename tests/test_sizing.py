"""`sizing`: the recipe sizes resolution, schedule length and MixUp from the data (BiT's HyperRule).

Each choice is checked where it lands (the crop of the training batches, the number of epochs the
fit runs, the batch mixing of the data module), each user value is kept, and the printed line
names what was chosen; thresholds are shrunk through `sizing.*` so a few dozen images exercise the
rule's branches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest

from conftest import compose_train
from finetune.cli.train import build, train
from finetune.data.shapes import write_image_folder
from finetune.errors import FinetuneError
from finetune.finetuning.sizing import Rule, plan_recipe

EVAL = 48


class ImageBatchSizes(L.Callback):
    """(height, width) of the image batches the model trains on (LP-FT's feature batches are 2-D)."""

    def __init__(self) -> None:
        self.sizes: set[tuple[int, int]] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch[0].dim() == 4:
            self.sizes.add(tuple(batch[0].shape[-2:]))


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory) -> Path:
    """16-px photos: 'small' for the rule (<= 96 px); 4 classes x 10, of which 36 train."""
    return write_image_folder(tmp_path_factory.mktemp("small16"), {"train": 10, "test": 2}, size=16)


def overrides(root: Path, *extra: str) -> list[str]:
    return ["experiment=offline_finetune", "model=mobilenet_v2", "model.weights=null", f"data.root={root}",
            f"data.image_size={EVAL}", f"data.resize_size={EVAL}", "data.batch_size=8", "data.num_workers=0",
            "finetune.callback.lp_epochs=1", "finetune.callback.feature_cache=false", "callbacks=none",
            "logger=[]", "+trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
            "trainer.precision=32-true", "+sizing.small_train_size=32", "+sizing.small_data_steps=10",
            "+sizing.min_epochs=1", *extra]


def test_small_photos_train_at_the_small_size_for_the_steps_the_rule_gives(small_photos, tmp_path, caplog):
    cfg = compose_train(overrides(small_photos), tmp_path)
    with caplog.at_level(logging.INFO, logger="finetune"):
        dm, model, trainer = build(cfg)
    sizes = ImageBatchSizes()
    trainer.callbacks.append(sizes)
    trainer.fit(model, datamodule=dm)
    # 36 training images at batch 8: 5 steps per epoch, so 10 steps are 2 epochs after the probe's 1.
    assert trainer.current_epoch == 3
    assert sizes.sizes == {(32, 32)}
    assert model.preprocessing.train_crop_size == 32 and model.preprocessing.crop_size == EVAL
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe sized from the data")]
    assert len(line) == 1 and "36 training images" in line[0] and "train at 32 px, evaluate at 48" in line[0]
    assert "2 fine-tuning epochs = 10 steps" in line[0] and "no MixUp" in line[0]
    assert cfg.sizing.train_image_size == "auto"  # the config says what was asked, not what was chosen


def test_values_the_user_gives_are_kept_and_said_to_be_theirs(small_photos, tmp_path, caplog):
    cfg = compose_train(overrides(small_photos, "data.train_image_size=40", "trainer.max_epochs=2"), tmp_path)
    with caplog.at_level(logging.INFO, logger="finetune"):
        dm, model, trainer = build(cfg)
    sizes = ImageBatchSizes()
    trainer.callbacks.append(sizes)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 2 and sizes.sizes == {(40, 40)}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe sized"))
    assert "data.train_image_size, yours" in line and "trainer.max_epochs=2, yours" in line


def test_mixup_only_for_large_data(small_photos, tmp_path):
    small = compose_train(overrides(small_photos), tmp_path / "small")
    dm, _, _ = build(small)
    dm.setup("fit")
    assert dm.batch_mix is None
    large = compose_train(overrides(small_photos, "+sizing.small_data=30"), tmp_path / "large")  # 36 >= 30
    dm, _, _ = build(large)
    dm.setup("fit")
    assert dm.batch_mix is not None and dm.mixup_alpha == Rule().mixup_alpha
    off = compose_train(overrides(small_photos, "+sizing.small_data=30", "sizing.mixup_alpha=0"), tmp_path / "off")
    dm, _, _ = build(off)
    dm.setup("fit")
    assert dm.batch_mix is None


def test_the_rule_scales_with_the_data():
    rule = Rule()
    small = plan_recipe(rule, n_train=900, source_size=32, eval_size=224, batch_size=32, finetune_starts_at=10)
    large = plan_recipe(rule, n_train=100_000, source_size=500, eval_size=224, batch_size=32, finetune_starts_at=10)
    assert small.train_image_size == rule.small_train_size and large.train_image_size is None
    assert small.finetune_steps == pytest.approx(rule.small_data_steps, abs=29)  # whole epochs of 29 steps
    assert large.finetune_epochs == rule.min_epochs  # 10k steps are fewer than 3 passes over 100k images
    assert small.mixup_alpha == 0 and large.mixup_alpha == rule.mixup_alpha
    assert small.max_epochs == 10 + small.finetune_epochs


def test_a_frozen_backbone_an_unknown_key_or_no_length_is_refused_in_one_line(small_photos, tmp_path):
    with pytest.raises(FinetuneError, match="trains no backbone; set sizing=null"):
        train(compose_train(overrides(small_photos, "finetune=frozen"), tmp_path / "frozen"))
    with pytest.raises(FinetuneError, match=r"trainer.max_epochs=null and sizing=null: nothing says how long"):
        train(compose_train(overrides(small_photos, "sizing=null"), tmp_path / "no_length"))
    with pytest.raises(FinetuneError, match=r"sizing has unknown keys \['steps'\]"):
        train(compose_train(overrides(small_photos, "+sizing.steps=3"), tmp_path / "unknown"))
