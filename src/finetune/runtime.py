"""What every entry point does around its work: build callbacks and loggers from config, record
hyperparameters, print results, and turn user errors into one line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree
from torch.nn import Module

from finetune.errors import FinetuneError, find_user_error
from finetune.hardware import resolve_precision, reuse_freed_memory
from finetune.hparams_view import METRICS, log_hparams, select_hparams
from finetune.run.distributed import is_global_zero

log = logging.getLogger("finetune")

CONFIG_TREE_ORDER = ("data", "model", "finetune", "callbacks", "logger", "trainer", "paths", "extras")


def instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); null entries are skipped."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c is not None and "_target_" in c]


@dataclass(frozen=True)
class SpeedSettings:
    """What a run's `auto`/null speed settings became on this machine: `precision` (for the Trainer;
    None: no trainer config), with `why`, and the model's resolved `channels_last` and `compile`
    (None: no model). The config stays as Hydra composed it; this record is what is passed on and logged."""

    precision: str | int | None
    why: str = ""
    channels_last: bool | None = None
    compile: bool | None = None

    def trainer_kwargs(self) -> dict[str, Any]:
        """The Trainer's argument that overrides `trainer.precision` (none when there is no trainer config)."""
        return {} if self.precision is None else {"precision": self.precision}

    def resolved(self) -> dict[str, Any]:
        """The values by config key, for the HParams columns (finetune.hparams_view.select_hparams)."""
        values = {"trainer.precision": self.precision, "model.channels_last": self.channels_last,
                  "model.compile": self.compile}
        return {key: value for key, value in values.items() if value is not None}


def resolve_speed_settings(cfg: DictConfig, model: Any | None = None) -> SpeedSettings:
    """`trainer.precision=auto` as the machine's best choice, and the model's resolved
    channels_last/compile: the record the Trainer is built with and the hparams log. `cfg` is read,
    never written: the run dir's .hydra/config.yaml stays what Hydra composed. Call before the
    Trainer is built."""
    if cfg.get("reuse_freed_memory", True):
        log.info("reuse_freed_memory: %s", reuse_freed_memory())
    precision, why = None, ""
    if cfg.get("trainer") is not None:
        precision, why = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
        log.info("precision: %s (%s)", precision, why)
    speed = SpeedSettings(precision, why)
    if model is not None:
        speed = replace(speed, **{key: bool(model.hparams[key]) for key in ("channels_last", "compile")
                                  if key in model.hparams})
        log.info("channels_last: %s | compile: %s", speed.channels_last, speed.compile)
    return speed


def instantiate_loggers(section: DictConfig | None, purge_step: int | None = None) -> list[Logger]:
    """The `logger` group's loggers; `purge_step` (a resumed run, finetune.cli.train.tensorboard_purge_step)
    goes to each TensorBoardLogger, which hides the steps the stopped run logged after its checkpoint."""
    if not section:
        return []
    return [hydra.utils.instantiate(c, **_purge_kwargs(c, purge_step))
            for c in section.values() if c is not None and "_target_" in c]


def _purge_kwargs(entry: DictConfig, purge_step: int | None) -> dict[str, int]:
    is_tensorboard = str(entry.get("_target_", "")).endswith("TensorBoardLogger")
    return {"purge_step": purge_step} if purge_step is not None and is_tensorboard else {}


def log_hyperparameters(cfg: DictConfig, loggers: list[Logger], resolved: dict[str, Any] | None = None,
                        resuming: bool = False) -> None:
    """The settings that tell runs apart (finetune.hparams_view) as hparams, with its METRICS as
    TensorBoard's HParams metrics column; not again when a resumed run continues its TensorBoard
    run. `resolved`: values this run decided, by config key (the crop size, the speed settings),
    shown instead of the config's. The whole config is in the run dir's .hydra/config.yaml."""
    if not resuming:
        log_hparams(loggers, select_hparams(cfg, resolved), METRICS)


def print_config_tree(cfg: DictConfig, first: Sequence[str] = CONFIG_TREE_ORDER) -> None:
    """The composed config as a rich tree, one branch per group (`first` on top, as
    lightning-hydra-template prints it), so a run's log starts with what it runs. Rank 0 only."""
    if not is_global_zero():
        return
    tree = Tree("config", style="dim", guide_style="dim")
    for group in [*(g for g in first if g in cfg), *(g for g in cfg if g not in first and g != "hydra")]:
        branch = tree.add(str(group), style="bold", guide_style="dim")
        value = cfg[group]
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    Console().print(tree)


def parameter_counts(module: Module) -> dict[str, float]:
    """Total and trainable parameter counts and the trainable fraction."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"params/total": total, "params/trainable": trainable,
            "params/trainable_fraction": trainable / total if total else 0.0}


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{float(metrics[key]):.4f}")
    Console().print(table)


def in_multirun() -> bool:
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


def user_errors_as_one_line(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Print a user's mistake as one `error:` line and exit 2; in a sweep, fail only that job."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except MissingMandatoryValue as e:
            key = e.full_key or "a value"
            error = FinetuneError(f"config key {key} is required: pass it as `{key}=...` on the command line")
        except Exception as e:
            error = find_user_error(e)
            if error is None:
                raise
        if in_multirun():
            raise error
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    return wrapper
