"""Outputs that cannot be written: one line naming the path (and the space needed), not a traceback.

A read-only or misspelt output path (a folder that is a file), a full disk, a quota or a file-size
limit surface as OSErrors from deep inside the writer (torch.save wraps them in a RuntimeError
whose own message names neither the file nor the cause). Entry points check their outputs before
any work (`check_writable`) and wrap the writing itself (`writing`), so a fault during the run is
the same one line; files are written to a temp name and renamed, so what was there stays.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError

SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
CANNOT_WRITE = SPACE | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.is_dir():
            return shutil.disk_usage(folder).free
    return None


def cannot_write(path: str | Path, error: OSError, needed: int | None = None) -> FinetuneError:
    """The one line for `error` while writing `path`; `needed`: bytes the file needs, if known."""
    path = Path(path)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a folder" if blocker else (error.strerror or str(error))
    if error.errno in SPACE:
        free = _free_bytes(path.parent)
        space = "".join((f"; it needs about {_megabytes(needed)}" if needed else "",
                         f", {_megabytes(free)} free there" if free is not None else ""))
        fix = "free some space (or raise the file-size limit, `ulimit -f`), or write elsewhere"
        return FinetuneError(f"cannot write {path} ({why}{space}); {fix}")
    return FinetuneError(f"cannot write {path} ({why}); choose a writable path")


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error` (torch.save raises a RuntimeError from the failed write)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in CANNOT_WRITE:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def writing(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a failure to write `path` inside the block into `cannot_write`'s one line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise
        raise cannot_write(path, cause, needed) from None


def check_writable(path: str | Path) -> None:
    """Before any work: `path`'s folder exists or can be made, and a file can be created in it."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{os.getpid()}.probe"
        with open(probe, "xb"):
            pass
        probe.unlink()


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) checkpoint dict: about the size torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
