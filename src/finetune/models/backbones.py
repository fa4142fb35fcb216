"""`create_backbone`: a torchvision classifier with its last layer removed, plus its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn

from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.models import weights as weights_lib


@dataclass
class Backbone:
    module: nn.Module
    num_features: int
    preprocessing: Preprocessing


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


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


def create_backbone(name: str, weights: str | None = "DEFAULT") -> Backbone:
    """Build `name` with `weights` loaded and its classifier removed.

    A random-init model keeps the preprocessing of the architecture's default weights, so that
    pretrained and from-scratch twins see identical inputs.
    """
    if name not in classification_models():
        raise FinetuneError(
            f"unknown model.name={name}; use a torchvision classification model such as "
            "resnet18, resnet50, mobilenet_v2, efficientnet_b0 (full list: torchvision.models.list_models())"
        )
    enum = weights_lib.torchvision_weights(name, weights)
    model = torchvision.models.get_model(name, weights=None)
    weights_lib.load_into(model, name, weights)
    preprocessing = preprocessing_of(enum or weights_lib.default_weights(name))
    return Backbone(model, strip_classifier(model), preprocessing)
