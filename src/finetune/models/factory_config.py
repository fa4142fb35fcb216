"""The optimizer and scheduler as plain config dicts in the hyperparameters, not Python objects.

Hydra hands the model `functools.partial` objects (`_partial_: true`); pickled into a checkpoint
they make it a program (torch's weights-only unpickler refuses them, see finetune.run.safe_checkpoint).
The model keeps their config instead, `{"_target_": "torch.optim.adam.Adam", "_partial_": True,
"lr": 0.001, ...}`, and builds the partial from it when it configures its optimizer. Building
checks the target is an optimizer (or scheduler) class, so a config read from a checkpoint can
only ever construct one.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import Container, OmegaConf

OPTIMIZER_TYPES: tuple[type, ...] = (torch.optim.Optimizer,)
SCHEDULER_TYPES: tuple[type, ...] = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes list values as ListConfig) as Python lists and dicts."""
    if isinstance(value, Container):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def as_config(factory: partial | Mapping | None) -> dict[str, Any] | None:
    """The plain config of `factory`: a partial (Hydra's `_partial_: true`), a config mapping with
    `_target_`, or None."""
    if factory is None:
        return None
    if isinstance(factory, partial):
        if factory.args:
            raise TypeError(f"{factory} has positional arguments; configure them by name")
        func = factory.func
        target = f"{func.__module__}.{func.__qualname__}"
        return {"_target_": target, "_partial_": True, **_plain(factory.keywords)}
    if isinstance(factory, (Mapping, Container)):
        config = _plain(factory)
        if "_target_" not in config:
            raise TypeError(f"{config} has no _target_ (e.g. _target_: torch.optim.Adam)")
        return {**config, "_partial_": True}
    raise TypeError(f"expected a partial or a config with _target_, not {type(factory).__name__}")


def as_factory(config: Mapping[str, Any], kinds: tuple[type, ...]) -> partial:
    """The partial `config` describes; its target must be a subclass of one of `kinds`."""
    cls = get_class(str(config["_target_"]))
    if not issubclass(cls, kinds):
        raise TypeError(f"{config['_target_']} is not a {' or '.join(k.__name__ for k in kinds)}")
    return partial(cls, **{k: v for k, v in config.items() if not str(k).startswith("_")})
