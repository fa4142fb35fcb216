"""Cache entries shared by concurrent jobs: built by one job under a lock, moved into place whole.

Jobs of a parallel sweep often need the same entry (a downloaded archive, an extracted data set,
a resized copy, a weights file) at the same moment. The first takes the entry's lock and builds
it under a temp name, then renames it into place; the others wait on the lock and find it built.
The lock is an OS file lock (`filelock`), so a killed holder releases it, and whatever a killed
writer left under a temp name is removed by the next holder: no entry is ever half there.
"""

from __future__ import annotations

import glob
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("finetune")
LOCK_SUFFIX = ".lock"


def lock_path(entry: Path) -> Path:
    """The lock file of `entry`: hidden, beside it, so that it is shared wherever the entry is."""
    return entry.parent / f".{entry.name}{LOCK_SUFFIX}"


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold `entry`'s lock; says in the log when another process holds it and this one waits."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is building %s", entry)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def remove_leftovers(folder: Path, prefix: str, suffix: str = "") -> None:
    """Delete the temp files and folders `prefix*suffix` in `folder`: what killed writers left.

    Call it while holding the entry's lock, when no live process can be writing one. Lock files
    are never removed: a process may be waiting on one.
    """
    for path in folder.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        if path.name.endswith(LOCK_SUFFIX):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
