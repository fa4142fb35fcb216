"""Which library builds `model.name`: torchvision first (so `resnet50` keeps meaning
torchvision's), then timm (`tf_efficientnet_lite0`, `convnext_tiny`, ...); `timm:NAME` picks timm."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torchvision

from finetune.errors import FinetuneError

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Architecture:
    library: str  # "torchvision" or "timm"
    name: str  # the name that library knows it by


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def architecture(name: str) -> Architecture:
    if name.startswith(TIMM_PREFIX) and timm.is_model(name[len(TIMM_PREFIX):]):
        return Architecture("timm", name[len(TIMM_PREFIX):])
    if name in classification_models():
        return Architecture("torchvision", name)
    if timm.is_model(name):
        return Architecture("timm", name)
    raise FinetuneError(
        f"unknown model.name={name}; use a torchvision classification model such as resnet18, "
        "resnet50, mobilenet_v2 (torchvision.models.list_models()) or a timm model such as "
        "tf_efficientnet_lite0, convnext_tiny (timm.list_models())"
    )
