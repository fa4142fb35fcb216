"""Weights files: torch.hub's cache, downloads checked against the hash in their name, state dicts
read with `weights_only=True`. Offline, the error names the file and the fix."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import urllib.error
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum

from finetune.errors import FinetuneError
from finetune.run.cache_lock import entry_lock, remove_leftovers

log = logging.getLogger("finetune")

DOWNLOAD_TIMEOUT_S = 15


def url_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def cache_path(weights: WeightsEnum) -> Path:
    return url_cache_path(weights.url)


@contextmanager
def socket_timeout(seconds: float):
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
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(path), hash_prefix=expected_hash, progress=False)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FinetuneError(
            f"cannot download {what} ({reason}); put the file {url} at {path} "
            "(or run `python -m finetune.cli.prefetch` with internet), or use model.weights=null "
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
