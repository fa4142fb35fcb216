"""Optimizer parameter groups: the new head, and the backbone (optionally one group per stage).

Each group carries a `name` (the learning-rate monitor uses it for its curve) and an `lr_mult`
applied to the optimizer's base learning rate, so `head_lr_mult=10` reproduces the d2l recipe and
`layer_decay` gives earlier stages geometrically smaller rates.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def backbone_stages(backbone: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The backbone's top-level children that own parameters, in input-to-output order."""
    stages = []
    for name, child in backbone.named_children():
        params = list(child.parameters())
        if params:
            stages.append((name, params))
    return stages


def param_groups(
    backbone: nn.Module,
    head: nn.Module,
    head_lr_mult: float = 1.0,
    layer_decay: float | None = None,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Groups for the optimizer; frozen parameters are left out unless `trainable_only=False`."""

    def keep(params: list[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if p.requires_grad or not trainable_only]

    groups: list[dict[str, Any]] = []
    if layer_decay is None:
        groups.append({"name": "backbone", "params": keep(list(backbone.parameters())), "lr_mult": 1.0})
    else:
        stages = backbone_stages(backbone)
        for depth, (name, params) in enumerate(stages):
            mult = layer_decay ** (len(stages) - 1 - depth)
            groups.append({"name": f"backbone.{name}", "params": keep(params), "lr_mult": mult})
    groups.append({"name": "head", "params": keep(list(head.parameters())), "lr_mult": head_lr_mult})
    return [g for g in groups if g["params"]]
