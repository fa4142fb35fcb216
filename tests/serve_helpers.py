"""A served checkpoint for tests and benchmarks: `python -m finetune.serve` in its own process
group on a free loopback port, waited for on /health, stopped at the end; and a small HTTP client
(stdlib http.client) that posts raw or multipart bodies."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def post_image(port: int, data: bytes, content_type: str = "image/png",
               multipart: bool = False) -> tuple[int, Any]:
    """POST /predict; returns (status, parsed JSON or the raw text if it is not JSON)."""
    if multipart:
        boundary = uuid.uuid4().hex
        data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n"
                f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
    status, body = request(port, "POST", "/predict", data, {"Content-Type": content_type})
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def _wait_healthy(process: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if request(port, "GET", "/health", timeout=5)[0] == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no /health after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (LitServe's workers too), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@contextlib.contextmanager
def served(ckpt: Path, run_dir: Path, *overrides: str, timeout: float = 240,
           source: str = "ckpt_path") -> Iterator[tuple[int, subprocess.Popen]]:
    """`python -m finetune.serve ckpt_path=ckpt OVERRIDES` (source="onnx": onnx=ckpt, an ONNX
    file) on a free port; yields (port, process)."""
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune.serve", f"{source}={ckpt}", f"port={port}",
             f"hydra.run.dir={run_dir}", *overrides],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        _wait_healthy(process, port, log, timeout)
        yield port, process
    finally:
        stop(process)
