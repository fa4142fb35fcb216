"""A fork server for `conftest.run_cli`: one interpreter imports the heavy third-party libraries
(torch, torchvision, Lightning, torchmetrics, Hydra) once, then forks a child per command that
runs the entry point as `python SCRIPT ARGS` would, in the command's directory, with its stdout
and stderr going where run_cli reads them.

Why: every `python train.py ...` pays 5-10 s of importing those libraries on a 2-core CI machine,
most of a run that ends in a one-line error, and the suite starts dozens of them. What stays as in
a fresh interpreter: the environment (run_cli uses this server only when a command's environment
equals the one the server started with, up to variables read only at run time (conftest.RUNTIME_ONLY;
the child gets the command's values); any other, e.g. SLURM variables or CUDA_VISIBLE_DEVICES,
gets a fresh `python`), the project's own modules (`finetune` is imported by the child, never by
the server), `__main__`, `sys.argv`, `sys.path[0]`, the working directory, the exit status
(negative for a signal, as subprocess reports it), atexit handlers and non-daemon threads at exit.
Processes the child starts itself (DDP ranks, spawned workers) are fresh interpreters as usual.
FINETUNE_TESTS_FRESH_CLI=1 turns the server off (every command a fresh interpreter).

Protocol on a Unix socket, one connection per command: the client sends one JSON line
{"argv": [script, *args], "cwd": dir, "env": {...}} with its stdout and stderr file descriptors attached
(SCM_RIGHTS); the server answers {"pid": child} then {"returncode": code}, one line each.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys


def _preimport() -> None:
    """Third-party libraries only: each child imports the project itself, as train.py does."""
    import hydra  # noqa: F401
    import lightning  # noqa: F401  (imports torch, torchvision and torchmetrics)
    import omegaconf  # noqa: F401
    import torch  # noqa: F401


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        msg, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(2 * fds.itemsize))
        if not msg:
            raise EOFError("client closed the connection")
        data += msg
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def serve(socket_path: str) -> dict:
    """Accept commands until the client goes away; in a command's child, return its request."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(8)
    server.settimeout(1.0)  # to notice, within a second, that pytest is gone (even SIGKILLed)
    parent = os.getppid()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stderr.flush()
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # orphaned: no one can send commands any more
                os._exit(0)
            continue
        try:
            request, fds = _recv_request(conn)
        except (EOFError, ValueError, OSError):
            conn.close()
            continue
        if os.fork() == 0:  # the waiter: starts the command's child, reports its pid and status
            server.close()
            child = os.fork()
            if child == 0:  # the command
                conn.close()
                return {**request, "fds": fds}
            for fd in fds:
                os.close(fd)
            try:
                _send(conn, {"pid": child})
                _, status = os.waitpid(child, 0)
                _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()
        while True:  # reap finished waiters
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def run_command(request: dict) -> None:
    """In the child: become `python SCRIPT ARGS` started in `cwd` (returns when the script ends)."""
    import runpy

    out, err = request["fds"]
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (out, 1), (err, 2)):
        os.dup2(source, target)
        os.close(source)
    os.environ.clear()
    os.environ.update(request["env"])  # the server's, up to conftest.RUNTIME_ONLY
    os.chdir(request["cwd"])
    script = os.path.abspath(request["argv"][0])
    sys.argv = [request["argv"][0], *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it (not this file's folder)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _preimport()
    run_command(serve(sys.argv[1]))
