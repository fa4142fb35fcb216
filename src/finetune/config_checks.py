"""Numbers a run cannot work with, caught before anything is built.

`data.batch_size=0` or `trainer.max_epochs=0` would otherwise surface as a library's traceback
minutes into a run (or, worse, as a run that silently trains nothing); each becomes one line that
names the key and its valid range.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from finetune.errors import FinetuneError


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(cfg: DictConfig, key: str, ok, valid: str, integer: bool = False) -> None:
    value = _value(cfg, key)
    if value is None:
        return
    if isinstance(value, str):
        raise FinetuneError(f"{key}={value!r} is a string, not a number{_as_text_hint(key, value)}; use {valid}")
    if not _is_number(value) or (integer and int(value) != value) or not ok(value):
        raise FinetuneError(f"{key}={value} is out of range; use {valid}")


def _as_text_hint(key: str, value: str) -> str:
    """A quoted number (`'model.optimizer.lr="1e-3"'`, `lr: "1e-3"` in a YAML file) is text."""
    try:
        float(value)
    except ValueError:
        return ""
    return f" (quoted: write {key}={value.strip()} without quotes)"


def check_options(cfg: DictConfig) -> None:
    """Choices that would otherwise fail, or silently do nothing, only after the whole fit."""
    from finetune.models.calibration import check_tta

    check_tta(cfg.get("tta"))
    if "sizing" in cfg and not cfg.sizing and _value(cfg, "trainer.max_epochs") is None \
            and _value(cfg, "trainer.max_steps") in (None, -1):
        raise FinetuneError("trainer.max_epochs=null and sizing=null: nothing says how long to train (Lightning "
                            "would run 1000 epochs); set trainer.max_epochs=N, or keep the recipe's sizing")
    why = _no_validation(cfg) if cfg.get("calibrate") else None
    if why:
        raise FinetuneError(f"calibrate=true fits the temperature on the validation batches, but this run "
                            f"validates none ({why}); give it validation batches or set calibrate=false")


def _no_validation(cfg: DictConfig) -> str | None:
    """Why the trainer runs no validation batch at all, or None (Lightning's limit_val_batches and
    check_val_every_n_epoch; runs bounded by max_steps are left to Lightning)."""
    limit = _value(cfg, "trainer.limit_val_batches")
    if _is_number(limit) and limit == 0:
        return f"trainer.limit_val_batches={limit}"
    every, epochs = _value(cfg, "trainer.check_val_every_n_epoch"), _value(cfg, "trainer.max_epochs")
    if _is_number(every) and _is_number(epochs) and epochs >= 1 and every > epochs:
        return f"trainer.check_val_every_n_epoch={every} > trainer.max_epochs={epochs}"
    return None


def check_numbers(cfg: DictConfig) -> None:
    """Raise a FinetuneError for the first value outside its valid range (null means unset)."""
    _require(cfg, "data.batch_size", lambda v: v >= 1, "an integer >= 1", integer=True)
    _require(cfg, "data.eval_batch_size", lambda v: v >= 1, "an integer >= 1 (or null: data.batch_size)", integer=True)
    _require(cfg, "data.image_size", lambda v: v >= 1, "an integer >= 1 (or null: from the weights)", integer=True)
    _require(cfg, "data.train_image_size", lambda v: v >= 1, "an integer >= 1 (or null: data.image_size)",
             integer=True)
    _require(cfg, "data.resize_size", lambda v: v >= 1, "an integer >= 1 (or null: from the weights)", integer=True)
    _require(cfg, "data.val_fraction", lambda v: 0 < v < 1, "a fraction strictly between 0 and 1, e.g. 0.1")
    _require(cfg, "data.max_bad_fraction", lambda v: 0 <= v <= 1, "a fraction from 0 to 1 (1.0 accepts any number)")
    _require(cfg, "data.num_workers", lambda v: v >= 0, "an integer >= 0 (or null: one less than the CPUs)", integer=True)
    _require(cfg, "model.optimizer.lr", lambda v: v > 0, "a learning rate > 0, e.g. 1e-3")
    _require(cfg, "model.optimizer.weight_decay", lambda v: v >= 0, "a weight decay >= 0")
    _require(cfg, "model.head_lr_mult", lambda v: v > 0, "a multiplier > 0")
    _require(cfg, "model.layer_decay", lambda v: 0 < v <= 1, "a factor in (0, 1] (or null: no layer decay)")
    _require(cfg, "model.label_smoothing", lambda v: 0 <= v < 1, "a value in [0, 1)")
    _require(cfg, "model.head_dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)")
    _require(cfg, "trainer.max_epochs", lambda v: v >= 1 or v == -1, "an integer >= 1 (-1: until max_steps)", integer=True)
    _require(cfg, "trainer.max_steps", lambda v: v >= 1 or v == -1, "an integer >= 1 (-1: no limit)", integer=True)


@torch.no_grad()
def _accepts(backbone: nn.Module, size: int, channels_last: bool) -> bool:
    x = torch.zeros(1, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        out = backbone(x)
    except (RuntimeError, ValueError, AssertionError, IndexError):
        return False
    return bool(torch.isfinite(out).all())


def check_input_size(backbone: nn.Module, size: int, key: str = "data.image_size",
                     channels_last: bool = False) -> None:
    """One forward pass of a blank image of `size` pixels; a backbone that cannot take it (too
    small for its downsampling, or a ViT with a fixed patch grid) is a one-line error naming the
    sizes it does take."""
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        if _accepts(backbone, size, channels_last):
            return
        tried = [s for s in (16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 384) if s != size]
        ok = [s for s in tried if _accepts(backbone, s, channels_last)]
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not ok:
        hint = "leave it null to use the weights' own size"
    elif len(ok) == len([s for s in tried if s >= ok[0]]) and ok[0] < tried[-1]:
        hint = f"use {key} >= {ok[0]} (or null: the weights' own size)"
    else:
        hint = f"use one of {', '.join(map(str, ok))} (or null: the weights' own size)"
    raise FinetuneError(f"{key}={size} is not an input size this backbone accepts; {hint}")
