"""`python train.py ...`: compose the config, fit, then test the best checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from finetune.config_checks import check_input_size, check_numbers
from finetune.distributed import one_run_for_all_ranks
from finetune.lr_finder import tune_learning_rate
from finetune.runtime import (
    instantiate_all,
    log_hyperparameters,
    print_metrics,
    resolve_speed_settings,
    user_errors_as_one_line,
)

log = logging.getLogger("finetune")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data, model and trainer from config; the data decides the head size and class names."""
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(
        cfg.model, num_classes=datamodule.num_classes, class_names=datamodule.classes
    )
    model.set_preprocessing(datamodule.adopt(model.preprocessing))
    if cfg.data.get("image_size") is not None:  # the weights' own size needs no check
        check_input_size(model.backbone, model.preprocessing.crop_size, channels_last=model.channels_last)
    log.info("classes: %s | preprocessing: %s", datamodule.classes, model.preprocessing)
    resolve_speed_settings(cfg, model)

    callbacks = instantiate_all(cfg.get("callbacks"))
    if cfg.get("finetune") and cfg.finetune.get("callback"):
        callbacks.append(hydra.utils.instantiate(cfg.finetune.callback))
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(cfg, loggers)
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as `cfg` says; returns the final metrics (the sweeper's objective among them)."""
    check_numbers(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    if cfg.get("tune_lr"):
        tune_learning_rate(trainer, model, datamodule, save_dir=cfg.paths.output_dir, **cfg.get("lr_finder", {}))

    # Resuming reads our own checkpoint, whose hparams hold the optimizer partials (pickled).
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint (fast_dev_run or no ModelCheckpoint): testing the current weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        if best:
            log.info("best checkpoint: %s", best)
    if trainer.is_global_zero:
        print_metrics("final metrics", {k: v for k, v in metrics.items() if k.split("/")[0] in ("val", "test")})
        # The sweep summary (finetune.sweep_summary) reads this.
        Path(cfg.paths.output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@user_errors_as_one_line
def main(cfg: DictConfig) -> float | None:
    with one_run_for_all_ranks():
        metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
