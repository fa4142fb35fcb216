"""Fixtures: compose the real configs, generate small image data, serve files on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from finetune.data.shapes import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Offline and quiet everywhere: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# In this process pytest-socket's --allow-hosts (pyproject addopts) refuses connections to anything
# but loopback; child processes (run_cli, subprocess, spawned workers) inherit this PYTHONPATH and
# apply the same rule from network_guard/sitecustomize.py.
NETWORK_GUARD = Path(__file__).resolve().parent / "network_guard"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(NETWORK_GUARD), os.environ.get("PYTHONPATH")) if p)


def compose_train(overrides: list[str], out_dir: Path, config_name: str = "train") -> DictConfig:
    """The composed config as `python train.py OVERRIDES` would see it, writing under `out_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir)
        cfg.paths.data_dir = str(out_dir / "data")
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    return functools.partial(compose_train, out_dir=tmp_path)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """A small ImageFolder tree (4 classes; 24 train and 8 test images per class)."""
    root = tmp_path_factory.mktemp("shapes")
    return write_image_folder(root, {"train": 24, "test": 8}, size=32)


def run_cli(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a root-level entry point as a user would."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False,
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def http_server(tmp_path):
    """Serve `tmp_path/www` on 127.0.0.1; yields (folder, base_url)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
