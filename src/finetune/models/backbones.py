"""`create_backbone`: a torchvision or timm classifier with its last layer removed, plus the
preprocessing its weights expect; what `model.name` and `model.weights` mean is resolved once, in
weights.py (`resolve` -> `WeightsSpec`), and the network is built from that spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torchvision
from torch import nn

from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.models import weights as weights_lib
from finetune.models.architecture import TIMM_PREFIX, Architecture, architecture  # noqa: F401  (its former home)
from finetune.models.weights import WeightsSpec


@dataclass
class Backbone:
    module: nn.Module
    num_features: int
    preprocessing: Preprocessing


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


def build_network(spec: WeightsSpec, drop_path: float | None = None) -> nn.Module:
    """The whole classifier as `spec` says to build it, weights not loaded yet. `drop_path` sets a
    timm model's stochastic depth rate (it has no parameters, so any weights load the same)."""
    extra = _drop_path_kwargs(spec.arch, drop_path)
    if spec.arch.library == "timm":
        return _create_timm(spec.build_name, **extra)
    return torchvision.models.get_model(spec.build_name, weights=None)


def create_network(
    name: str, weights: str | None = "DEFAULT", drop_path: float | None = None
) -> tuple[nn.Module, Preprocessing]:
    """The whole classifier (ImageNet head included) with `weights` loaded, and its preprocessing."""
    spec = weights_lib.resolve(name, weights)
    return load_network(spec, drop_path), spec.preprocessing


def load_network(spec: WeightsSpec, drop_path: float | None = None) -> nn.Module:
    model = build_network(spec, drop_path)
    spec.load(model)
    return model


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


def create_backbone(name: str, weights: str | None = "DEFAULT", drop_path: float | None = None,
                    spec: WeightsSpec | None = None) -> Backbone:
    """Build `name` with `weights` loaded and its classifier removed (`drop_path`: timm's rate);
    `spec`: those two resolved already (by the caller that decided the preprocessing from it)."""
    if spec is None:
        spec = weights_lib.resolve(name, weights)
    elif (spec.name, spec.weights) != (name, weights):
        raise ValueError(f"the weights spec is for {spec.name} {spec.weights}, not {name} {weights}")
    model = load_network(spec, drop_path)
    num_features = strip_timm_classifier(model) if spec.arch.library == "timm" else strip_classifier(model)
    return Backbone(model, num_features, spec.preprocessing)
