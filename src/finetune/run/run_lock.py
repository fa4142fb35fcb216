"""One training process per run dir: an exclusive `flock` on `RUN_DIR/.finetune.lock`.

Two processes training in one run dir (two `resume=auto` commands on the same fixed
`hydra.run.dir`) would interleave their checkpoints and event files. The first takes the lock and
holds it as long as it trains; the second refuses at once, in one line naming the holder's pid
(it does not wait: a queued run that starts after the first one finished would silently train
the same run again). The kernel drops a `flock` when its process ends in any way, SIGKILL
included, so a killed run never leaves a stale lock; the pid in the file is for the message only.
Only rank zero locks: DDP's other ranks are the same run.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import FinetuneError

LOCK_FILE = ".finetune.lock"
_held: dict[Path, int] = {}  # run dir -> the open, locked file (this process's locks)


def hold(run_dir: str | Path) -> bool:
    """Lock `run_dir` (created if missing) for this process; False if this process holds it already.

    Raises a FinetuneError when another process holds it."""
    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir in _held:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FinetuneError(f"{run_dir} is in use by another training process (pid {holder}); wait for it to "
                            "end, or train in another dir (hydra.run.dir=...)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = fd
    return True


def release(run_dir: str | Path) -> None:
    """Drop this process's lock on `run_dir` (the file stays: removing it would race a new holder)."""
    fd = _held.pop(Path(run_dir).expanduser().resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the file drops the flock


@contextmanager
def locked(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir` for the block; a lock this process took earlier (before Hydra wrote the
    dir, see finetune.run.resume.prepare_argv) stays held for the life of the process."""
    taken = hold(run_dir)
    try:
        yield
    finally:
        if taken:
            release(run_dir)
