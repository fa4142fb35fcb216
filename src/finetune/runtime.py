"""What every entry point does around its work: build callbacks and loggers from config, record
hyperparameters, print results, and turn user errors into one line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree
from torch.nn import Module

from finetune.distributed import is_global_zero
from finetune.errors import FinetuneError, find_user_error
from finetune.hardware import resolve_precision, reuse_freed_memory
from finetune.hparams_view import METRICS, log_hparams, select_hparams

log = logging.getLogger("finetune")

CONFIG_TREE_ORDER = ("data", "model", "finetune", "callbacks", "logger", "trainer", "paths", "extras")


def instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); null entries are skipped."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c is not None and "_target_" in c]


def resolve_speed_settings(cfg: DictConfig, model: Any | None = None) -> None:
    """Replace `trainer.precision=auto` with the machine's best choice and copy the model's
    resolved channels_last/compile into `cfg`, so the printed, logged and saved config all say
    what actually runs. Call before the Trainer is built."""
    if cfg.get("reuse_freed_memory", True):
        log.info("reuse_freed_memory: %s", reuse_freed_memory())
    with open_dict(cfg):
        if cfg.get("trainer") is not None:
            precision, why = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
            cfg.trainer.precision = precision
            log.info("precision: %s (%s)", precision, why)
        if model is not None and cfg.get("model") is not None:
            for key in ("channels_last", "compile"):
                if key in model.hparams:
                    cfg.model[key] = bool(model.hparams[key])
            log.info("channels_last: %s | compile: %s", cfg.model.get("channels_last"), cfg.model.get("compile"))
    _resave_run_config(cfg)


def _resave_run_config(cfg: DictConfig) -> None:
    """Hydra saved the run's config before these values were known; save it again."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return
    output_dir = OmegaConf.select(hc, "runtime.output_dir", default=None, throw_on_missing=False)
    if not hc.output_subdir or not output_dir:
        return
    path = Path(output_dir) / hc.output_subdir / "config.yaml"
    if path.exists():
        OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), path)


def log_hyperparameters(cfg: DictConfig, loggers: list[Logger], image_size: int | None = None,
                        resuming: bool = False) -> None:
    """The settings that tell runs apart (finetune.hparams_view) as hparams, with its METRICS as
    TensorBoard's HParams metrics column; not again when a resumed run continues its TensorBoard
    run. The whole config is in the run dir's .hydra/config.yaml."""
    if not resuming:
        log_hparams(loggers, select_hparams(cfg, image_size), METRICS)


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
