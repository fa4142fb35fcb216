"""What every entry point does around its work: build callbacks and loggers from config, record
hyperparameters, print results, and turn user errors into one line."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.table import Table

from finetune.errors import FinetuneError, find_user_error

log = logging.getLogger("finetune")


def instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); null entries are skipped."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c is not None and "_target_" in c]


def log_hyperparameters(cfg: DictConfig, loggers: list[Logger], metric: str = "val/acc_best") -> None:
    """The resolved config as hparams, with `metric` registered so TensorBoard's HParams view shows it."""
    params = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    for lg in loggers:
        try:
            lg.log_hyperparams(params, metrics={metric: 0.0})
        except TypeError:
            lg.log_hyperparams(params)


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
        except Exception as e:  # noqa: BLE001 - only user errors are caught, the rest re-raised
            error = find_user_error(e)
            if error is None:
                raise
        if in_multirun():
            raise error
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    return wrapper
