"""`python eval.py ckpt_path=PATH [data=...]`: test a checkpoint and show which classes it confuses.

The model, its class names and its transforms come from the checkpoint alone. Without `data=...`
the training run's own data config (saved by Hydra next to the checkpoint) is used, so the same
test split is evaluated.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from finetune.callbacks import ConfusionMatrix
from finetune.cli.config_source import entry_point
from finetune.config_checks import check_numbers
from finetune.data.preprocessing import decide_for
from finetune.errors import FinetuneError
from finetune.models.checkpoint import load_classifier
from finetune.runtime import (
    instantiate_all,
    resolve_speed_settings,
)

log = logging.getLogger("finetune")


def training_data_config(ckpt_path: str) -> DictConfig:
    """The `data` section of the run that wrote `ckpt_path` (RUN/checkpoints/x.ckpt -> RUN/.hydra)."""
    for folder in list(Path(ckpt_path).expanduser().resolve().parents)[:3]:
        saved = folder / ".hydra" / "config.yaml"
        if saved.is_file():
            run_cfg = OmegaConf.load(saved)
            if run_cfg.get("data") is not None:
                log.info("data config from the training run: %s", saved)
                return run_cfg.data
    raise FinetuneError(
        f"no training run config (.hydra/config.yaml) found above {ckpt_path}; "
        "say which data to evaluate on, e.g. data=folder data.root=DIR"
    )


def confusion_table(matrix, class_names: list[str]) -> Table:
    table = Table(title="confusion matrix (rows: true, columns: predicted)")
    table.add_column("true \\ pred")
    for name in class_names:
        table.add_column(name, justify="right")
    for name, row in zip(class_names, matrix.tolist()):
        table.add_row(name, *(str(v) for v in row))
    return table


def per_class_table(views: ConfusionMatrix) -> Table:
    table = Table(title="per class")
    for column in ("class", "precision", "recall", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    support = views.matrix.sum(dim=1).tolist()
    for name, p, r, n in zip(views.class_names, views.precision.tolist(), views.recall.tolist(), support):
        table.add_row(name, f"{p:.4f}", f"{r:.4f}", str(n))
    return table


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test `cfg.ckpt_path` on `cfg.data` (or the run's data); returns the test metrics."""
    check_numbers(cfg)
    model = load_classifier(cfg.ckpt_path, trust=bool(cfg.get("trust_checkpoint")))
    model.set_tta(cfg.get("tta"))
    datamodule = hydra.utils.instantiate(cfg.data if cfg.get("data") else training_data_config(cfg.ckpt_path))
    if list(datamodule.classes) != list(model.class_names):
        raise FinetuneError(
            f"the data's classes {list(datamodule.classes)} differ from the checkpoint's "
            f"{list(model.class_names)}; evaluate on data with the same class folders"
        )
    # The checkpoint's preprocessing, with this data config's explicit values on top: decided once, given to both.
    model.set_preprocessing(decide_for(datamodule, model.preprocessing))
    log.info("checkpoint: %s | classes: %s | preprocessing: %s | temperature: %.4g | tta: %s", cfg.ckpt_path,
             model.class_names, model.preprocessing, model.applied_temperature, model.tta)

    speed = resolve_speed_settings(cfg)
    callbacks = instantiate_all(cfg.get("callbacks"))
    views = next((c for c in callbacks if isinstance(c, ConfusionMatrix)), None)
    if views is None:
        views = ConfusionMatrix(save_dir=cfg.paths.output_dir)
        callbacks.append(views)
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 **speed.trainer_kwargs())
    trainer.test(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}

    if trainer.is_global_zero:
        console = Console()
        console.print(f"checkpoint: {cfg.ckpt_path}" + (f" (test-time augmentation: {model.tta})" if model.tta else ""),
                      markup=False, highlight=False)
        if "test/ece" in metrics:
            console.print(f"calibration: test ECE {metrics['test/ece']:.4f} from the network, "
                          f"{metrics['test/ece_calibrated']:.4f} with its temperature {model.applied_temperature:.4g}")
        console.print(per_class_table(views))
        console.print(confusion_table(views.matrix, views.class_names))
        if views.save_dir is not None:
            console.print(f"saved confusion_matrix.csv/.png and per_class.csv in {views.save_dir}")
    return metrics


main = entry_point('eval', evaluate)


if __name__ == "__main__":
    main()
