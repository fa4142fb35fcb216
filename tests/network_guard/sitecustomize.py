"""The tests' network guard, for the Python processes a test starts (train.py via `run_cli`,
`python -m finetune.cli.prefetch`, DataLoader and DDP workers that spawn).

tests/conftest.py puts this folder on PYTHONPATH, so every child interpreter imports this module
at startup and gets the same rule pytest-socket applies in the test process: connections to
loopback (and Unix sockets) only; anything else raises pytest-socket's SocketConnectBlockedError,
a RuntimeError, so code that turns network OSErrors into a friendly message cannot hide it.
"""

from pytest_socket import socket_allow_hosts

LOOPBACK = ["127.0.0.1", "localhost", "::1"]

socket_allow_hosts(LOOPBACK, allow_unix_socket=True)
