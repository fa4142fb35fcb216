"""Checkpoints are data: every load goes through torch's weights-only unpickler.

A `.ckpt` is a pickle, and `torch.load(weights_only=False)` calls whatever callable the pickle
names (a `__reduce__` can write files or start processes), so a checkpoint shared by someone else
would be a program. Everything this project writes into a checkpoint is plain data that torch's
weights-only unpickler reads: tensors, numbers, strings, None, and lists, tuples and dicts of them
(the optimizer and scheduler as their config dicts with `_target_`, the RNG states as tensors and
numbers, Lightning's loops, callbacks' and optimizer states). `SAFE_GLOBALS` lists what is allowed
beyond torch's own defaults; any other global is refused in one line naming the file and the global.

`trust_checkpoint=true` (every entry point) reads a file with the full unpickler, running any code
it holds: only for a file you wrote yourself with an older version of this project, whose
hyperparameters held the optimizer as a Python object.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

# Beyond torch's defaults (tensors, storages, dtypes, devices, OrderedDict, ...): nothing, today.
# Add a type here only if it holds data and runs no code on unpickling.
SAFE_GLOBALS: list[Any] = []
torch.serialization.add_safe_globals(SAFE_GLOBALS)

# What torch.load raises for a file it cannot read: a damaged archive (RuntimeError from the zip
# reader), a damaged pickle, a short read. (A file that would run code is a FinetuneError instead.)
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, ImportError, AttributeError,
               OSError, KeyError)
TRUST_HINT = ("if you wrote it yourself with an older finetune and trust it, pass trust_checkpoint=true "
              "(loads it with the full unpickler, which runs any code it holds)")
_GLOBAL = re.compile(r"GLOBAL (\S+)")


def offending_global(path: str | Path, error: BaseException) -> str | None:
    """The globals the file names that the weights-only unpickler refuses (comma-separated), else None.

    torch's own scan of the pickle's opcodes (nothing is executed) names them all; the error
    message is the fallback for a file the scan cannot read."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001  a file the scan cannot read: the error message still names it
        names = []
    if names:
        return ", ".join(sorted(set(names)))
    found = _GLOBAL.search(str(error))
    return found.group(1) if found else None


@contextmanager
def refusing_code(path: str | Path) -> Iterator[None]:
    """Turn the weights-only unpickler's refusal into one line naming `path` and the global."""
    try:
        yield
    except pickle.UnpicklingError as error:
        name = offending_global(path, error)
        if name is None:
            raise
        raise FinetuneError(f"checkpoint {path} holds {name}, which a checkpoint may not hold (loading it "
                            f"would run code; see README \"Security\"); refused. {TRUST_HINT}") from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu", trust: bool = False, mmap: bool = True) -> Any:
    """`torch.load` of a local checkpoint with the weights-only unpickler; `trust`: the full one."""
    if trust:
        log.warning("trust_checkpoint=true: loading %s with the full unpickler, which runs any code the "
                    "file holds; use it only for files you trust", path)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    with refusing_code(path):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
