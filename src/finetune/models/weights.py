"""Where pretrained weights come from: a torchvision weights name, a local file, or nothing.

Downloads go through torch.hub's cache, so a file placed there by hand (or by `finetune.prefetch`)
is used without network. Offline, the error names the exact path to put the file at.
"""

from __future__ import annotations

import os
import socket
import urllib.error
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from finetune.errors import FinetuneError

DOWNLOAD_TIMEOUT_S = 15
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def is_file_reference(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith(FILE_SUFFIXES)


def torchvision_weights(model_name: str, weights: str | None) -> WeightsEnum | None:
    """The torchvision weights enum member for `weights` (e.g. DEFAULT, IMAGENET1K_V2), or None."""
    if weights is None or is_file_reference(weights):
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
            "null (random init) or a path to a state dict"
        ) from None


def default_weights(model_name: str) -> WeightsEnum | None:
    """The weights whose preprocessing a random-init model still borrows, if torchvision has any."""
    try:
        return torchvision.models.get_model_weights(model_name).DEFAULT
    except (KeyError, ValueError, AttributeError):
        return None


def cache_path(weights: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


@contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """The weights' state dict, from torch.hub's cache or, failing that, from the network."""
    path = cache_path(weights)
    if not path.exists():
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(weights.url, str(path), progress=True)
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FinetuneError(
                f"cannot download {weights} ({reason}); put the file {weights.url} at {path} "
                "(or run `python -m finetune.prefetch` with internet), or use model.weights=null "
                "for random init, or model.weights=/path/to/state_dict.pth"
            ) from None
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FinetuneError(f"model.weights={path}: no such file; give a state dict saved with torch.save")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_into(model: nn.Module, model_name: str, weights: str | None) -> None:
    """Load `weights` into the full torchvision model (its ImageNet classifier included)."""
    if weights is None:
        return
    enum = torchvision_weights(model_name, weights)
    state = fetch_state_dict(enum) if enum is not None else load_state_dict_file(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise FinetuneError(
            f"model.weights={weights} does not fit {model_name}: {first}; "
            "give a state dict saved from the same architecture"
        ) from None
