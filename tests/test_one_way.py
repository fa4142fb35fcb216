"""One way through a build (issue 23): the weights are resolved once, the preprocessing is decided
once and the data module and the model hold the same one, and the config Hydra composed is read,
never rewritten (neither `cfg` nor the run dir's .hydra/config.yaml)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from finetune.cli.train import build
from finetune.data.preprocessing import decide_preprocessing
from finetune.data.transforms import Preprocessing
from finetune.models import weights as weights_lib

TINY = ["data=shapes", "data.train_size=16", "data.val_size=8", "data.test_size=8", "data.num_workers=0",
        "data.batch_size=8", "model.weights=null", "trainer.max_epochs=1", "finetune=frozen",
        "callbacks.rich_progress_bar=null", "logger=tensorboard"]


def _saved_config(cfg, run_dir: Path) -> Path:
    """The run config as Hydra saves it before the task runs."""
    path = run_dir / ".hydra" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), path)
    return path


def test_a_build_leaves_the_composed_config_and_its_saved_copy_as_they_were(make_cfg, tmp_path):
    cfg = make_cfg([*TINY, "trainer.precision=auto"])
    saved = _saved_config(cfg, tmp_path)
    composed, on_disk = OmegaConf.to_yaml(cfg), saved.read_text()
    _, model, trainer = build(cfg)
    assert OmegaConf.to_yaml(cfg) == composed
    assert saved.read_text() == on_disk and "precision: auto" in on_disk
    assert trainer.precision != "auto" and model.hparams.channels_last is True  # resolved, passed on, not written back


def test_a_resumed_build_passes_purge_step_to_tensorboard_without_touching_the_config(make_cfg, tmp_path):
    cfg = make_cfg(TINY)
    composed = OmegaConf.to_yaml(cfg)
    _, _, trainer = build(cfg, resuming=True, purge_step=7)
    tensorboard = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    assert tensorboard and tensorboard[0]._kwargs.get("purge_step") == 7
    assert OmegaConf.to_yaml(cfg) == composed


def test_a_build_resolves_the_weights_once(make_cfg, monkeypatch):
    calls = []
    resolve = weights_lib.resolve
    monkeypatch.setattr(weights_lib, "resolve", lambda *args: calls.append(args) or resolve(*args))
    build(make_cfg(TINY))
    assert calls == [("resnet18", None)]


def test_data_and_model_get_the_one_decided_preprocessing(make_cfg):
    cfg = make_cfg([*TINY, "data.image_size=40", "data.resize_size=null", "data.train_image_size=32"])
    datamodule, model, _ = build(cfg)
    p = model.preprocessing
    assert datamodule.preprocessing == p and datamodule.preprocessing.explicit == p.explicit
    assert (p.crop_size, p.train_size, p.resize_size) == (40, 32, round(40 * 256 / 224))  # resnet18's ratio
    assert {"crop_size", "train_crop_size"} <= set(p.explicit) and "resize_size" not in p.explicit
    assert Preprocessing.from_dict(model.hparams.preprocessing) == p  # what the checkpoint carries


def test_the_weights_own_size_is_not_explicit(make_cfg):
    cfg = make_cfg([*TINY, "data.image_size=null", "data.resize_size=null"])
    datamodule, model, _ = build(cfg)
    assert datamodule.preprocessing == model.preprocessing and model.preprocessing.crop_size == 224
    assert "crop_size" not in model.preprocessing.explicit


def test_decide_applies_source_then_user_each_on_the_last_ratio():
    weights = Preprocessing(crop_size=224, resize_size=256)
    p = decide_preprocessing(weights, {"crop_size": 48, "resize_size": 48, "draft_decode": False},
                             {"crop_size": 64, "mean": None})
    assert (p.crop_size, p.resize_size, p.draft_decode) == (64, 64, False)  # the source's 1:1 ratio kept
    assert p.explicit == ("crop_size", "draft_decode", "resize_size")
    assert decide_preprocessing(weights).explicit == () and decide_preprocessing(weights) == weights
