"""Fixtures: compose the real configs, generate small image data, serve files on 127.0.0.1."""

from __future__ import annotations

import atexit
import functools
import http.server
import io
import json
import locale
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# pytest-xdist (make test runs `-n auto`): its workers share the cores, so each worker, and every
# process it starts (CLIs, DDP ranks), gets its share of torch threads instead of all of them each;
# without this, 2 workers on 2 cores ran slower than 1. Set before torch is imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _THREADS)

from finetune.data.shapes import write_image_folder  # imports torch: after the thread settings

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


# The tests that take over a minute and a half, started first: with xdist's `load` schedule
# (longest first, each worker takes the next test when it is free) none of them is left running
# alone at the end while the other worker idles (the quick start did that: 280 s of a 1,230-s run).
LONGEST_FIRST = ("test_quickstart_learns_the_shapes", "test_installed_wheel_trains", "test_tiny_cpu_run_measures")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests, then the other slow ones, then the rest (stable within each group)."""
    def rank(item: pytest.Item) -> int:
        for i, name in enumerate(LONGEST_FIRST):
            if item.name.startswith(name):
                return i
        return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)
    items.sort(key=rank)


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
    """Run a root-level entry point as a user would: `python SCRIPT ARGS` in `cwd`.

    Forked from tests/cli_zygote.py (torch and Lightning already imported) when the environment is
    the one that server started with; otherwise (or with FINETUNE_TESTS_FRESH_CLI=1) a fresh
    interpreter."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    command = [sys.executable, str(ROOT / script), *args]
    server = _cli_server(full_env, own_env=not env)
    if server is not None:
        return server.run(command, cwd=cwd or ROOT, env=full_env, timeout=timeout)
    return subprocess.run(command, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)


# Set in this process while tests run (pytest's test name, Lightning's seed_everything, the streaming
# data module's setdefault), read only at run time: none of the libraries the server imports reads
# them on import, and the child gets the command's values.
RUNTIME_ONLY = {"PYTEST_CURRENT_TEST", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "AWS_ALLOW_HTTP"}


class CliServer:
    """The client side of tests/cli_zygote.py (see its docstring for what stays as in a fresh run)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.noted = False
        self.folder = Path(tempfile.mkdtemp(prefix="finetune-cli-"))
        self.socket_path = str(self.folder / "socket")
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "cli_zygote.py"), self.socket_path],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        if self.process.stdout.readline().strip() != "ready":
            self.process.wait()
            raise RuntimeError(f"the CLI fork server did not start (exit {self.process.returncode})")

    def serves(self, env: dict[str, str], note: bool) -> bool:
        """Whether `env` is the server's, up to RUNTIME_ONLY variables (the child gets the command's
        values of those). With `note`, a difference (the tests' own environment changed) is said once."""
        if self.process.poll() is not None:
            return False
        differ = _differ(env, self.env)
        if differ and note and not self.noted:
            self.noted = True
            print(f"conftest: {', '.join(differ)} differ from the CLI fork server's environment: "
                  "a fresh interpreter for such commands", file=sys.stderr)
        return not differ

    def run(self, command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.socket_path)
            request = json.dumps({"argv": command[1:], "cwd": str(cwd), "env": env}).encode() + b"\n"
            socket.send_fds(conn, [request], [out.fileno(), err.fileno()])
            with conn.makefile("r") as replies:
                pid = json.loads(replies.readline())["pid"]
                conn.settimeout(timeout)
                try:
                    line = replies.readline()
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(command, timeout, _text(out), _text(err)) from None
            returncode = json.loads(line)["returncode"]
            return subprocess.CompletedProcess(command, returncode, _text(out), _text(err))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _differ(env: dict[str, str], other: dict[str, str]) -> list[str]:
    return sorted(k for k in env.keys() | other.keys() if k not in RUNTIME_ONLY and env.get(k) != other.get(k))


def _text(file) -> str:
    """What `subprocess.run(..., text=True)` gives: locale-decoded, universal newlines."""
    file.seek(0)
    return io.TextIOWrapper(io.BytesIO(file.read()), encoding=locale.getpreferredencoding(False)).read()


# The environment run_cli gives commands when no test has changed it; the server runs in this one.
CLI_ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
_servers: list[CliServer | None] = []


def _cli_server(env: dict[str, str], own_env: bool) -> CliServer | None:
    """The fork server for a command in `env` (`own_env`: run_cli was given no environment), started
    by the first command that it can serve; None where it cannot serve this one."""
    if os.environ.get("FINETUNE_TESTS_FRESH_CLI") == "1":
        return None
    if not _servers:
        if _differ(env, CLI_ENV):
            return None
        try:
            _servers.append(CliServer(CLI_ENV))
            atexit.register(_servers[0].close)
        except (OSError, RuntimeError) as error:  # then every command runs in a fresh interpreter
            print(f"conftest: no CLI fork server ({error}); fresh interpreters", file=sys.stderr)
            _servers.append(None)
    server = _servers[0]
    return server if server is not None and server.serves(env, note=own_env) else None


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
