"""`create_backbone`: a torchvision or timm classifier with its last layer removed, plus its preprocessing.

`model.name` is looked up in torchvision first (so `resnet50` keeps meaning torchvision's), then in
timm (`tf_efficientnet_lite0`, `convnext_tiny`, ...); `timm:NAME` picks timm explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torchvision
from timm.data import resolve_data_config
from torch import nn

from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.models import weights as weights_lib

TIMM_PREFIX = "timm:"


@dataclass
class Backbone:
    module: nn.Module
    num_features: int
    preprocessing: Preprocessing


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


def preprocessing_of(weights) -> Preprocessing:
    """Sizes, mean, std and interpolation from torchvision's weights metadata."""
    if weights is None:
        return Preprocessing()
    tf = weights.transforms()
    return Preprocessing(
        crop_size=int(tf.crop_size[0]),
        resize_size=int(tf.resize_size[0]),
        mean=tuple(tf.mean),
        std=tuple(tf.std),
        interpolation=tf.interpolation.value,
    )


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    """Sizes, mean, std and interpolation from the timm model's pretrained config."""
    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    return Preprocessing(
        crop_size=crop,
        resize_size=math.floor(crop / cfg["crop_pct"]),  # as timm.data.create_transform does
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
    )


def _drop_path_kwargs(arch: Architecture, drop_path: float | None) -> dict[str, float]:
    """timm's `drop_path_rate` for `model.drop_path`; a user error where it cannot apply."""
    if drop_path is None:
        return {}
    if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0 <= drop_path < 1:
        raise FinetuneError(f"model.drop_path={drop_path} is out of range; use a rate in [0, 1), e.g. 0.1, or null")
    if arch.library != "timm":
        if drop_path == 0:
            return {}
        raise FinetuneError(f"model.drop_path={drop_path}: the torchvision model {arch.name} has no stochastic "
                            f"depth to set; use a timm model (e.g. model.name=timm:{arch.name}) or model.drop_path=null")
    return {"drop_path_rate": float(drop_path)}


def _create_timm(name: str, **kwargs: float) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as error:  # the model's constructor has no such argument
        if "drop_path_rate" not in str(error):
            raise
        raise FinetuneError(f"model.drop_path: the timm model {name} has no stochastic depth (drop_path_rate); "
                            "use model.drop_path=null") from None


def build_network(
    name: str, weights: str | None, drop_path: float | None = None
) -> tuple[nn.Module, Architecture, Preprocessing]:
    """The whole classifier, weights not loaded yet, and the preprocessing those weights expect.

    A random-init model keeps the preprocessing of the architecture's default weights, so that
    pretrained and from-scratch twins see identical inputs. `drop_path` sets a timm model's
    stochastic depth rate (it has no parameters, so any weights load the same).
    """
    arch = architecture(name)
    extra = _drop_path_kwargs(arch, drop_path)
    if arch.library == "timm":
        model = _create_timm(weights_lib.timm_pretrained_name(arch.name, weights) or arch.name, **extra)
        return model, arch, timm_preprocessing(model)
    enum = weights_lib.torchvision_weights(arch.name, weights)
    model = torchvision.models.get_model(arch.name, weights=None)
    return model, arch, preprocessing_of(enum or weights_lib.default_weights(arch.name))


def create_network(
    name: str, weights: str | None = "DEFAULT", drop_path: float | None = None
) -> tuple[nn.Module, Preprocessing]:
    """The whole classifier (ImageNet head included) with `weights` loaded, and its preprocessing."""
    model, arch, preprocessing = build_network(name, weights, drop_path)
    weights_lib.resolve(weights, model, arch.name, arch.library).load()
    return model, preprocessing


def strip_classifier(model: nn.Module) -> int:
    """Replace the model's last Linear layer with Identity; return the feature width it took."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise FinetuneError(f"{type(model).__name__} has no Linear classifier to replace; pick another model.name")
    name, linear = last
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return linear.in_features


def strip_timm_classifier(model: nn.Module) -> int:
    """timm's own way: pooled features out, classifier gone; the width the new head receives."""
    model.reset_classifier(0)
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def create_backbone(name: str, weights: str | None = "DEFAULT", drop_path: float | None = None) -> Backbone:
    """Build `name` with `weights` loaded and its classifier removed (`drop_path`: timm's rate)."""
    model, preprocessing = create_network(name, weights, drop_path)
    timm_model = architecture(name).library == "timm"
    num_features = strip_timm_classifier(model) if timm_model else strip_classifier(model)
    return Backbone(model, num_features, preprocessing)
