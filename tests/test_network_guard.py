"""The tests' network guard itself: outside loopback, a connection fails the test that tried it,
in the test process (pytest-socket) and in the processes it starts (tests/network_guard)."""

from __future__ import annotations

import socket
import subprocess
import sys
from urllib.request import urlopen

import pytest
from pytest_socket import SocketConnectBlockedError

UNROUTABLE = ("10.255.255.1", 80)  # private and unrouted: without the guard, a timeout


def test_a_connection_outside_loopback_is_refused_in_the_test_process():
    with pytest.raises(SocketConnectBlockedError, match="10.255.255.1"):
        socket.create_connection(UNROUTABLE, timeout=2)


def test_loopback_stays_open(http_server):
    www, base = http_server
    (www / "hello.txt").write_text("hi")
    with urlopen(f"{base}/hello.txt", timeout=5) as response:
        assert response.read() == b"hi"


def test_child_processes_get_the_same_guard():
    code = f"import socket; socket.create_connection({UNROUTABLE!r}, timeout=2)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0
    assert "SocketConnectBlockedError" in result.stderr and "10.255.255.1" in result.stderr, result.stderr
