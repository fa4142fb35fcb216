"""Checkpoints written whole or not at all (conf/trainer/default.yaml: `plugins`).

Lightning's TorchCheckpointIO writes local checkpoints through an fsspec transaction: into a temp
file in the system's temp dir, then moved to the checkpoint's path. When that temp dir is on
another file system than the run dir (a node's local /tmp, a run dir on the cluster's shared file
system: the usual case) the move is a copy into the final path, so a job killed or preempted
while saving leaves a truncated last.ckpt where the good one was, plus a stray temp file. Here the
checkpoint is written to a temp name in its own folder, flushed to disk, and renamed over the old
one: a reader sees the previous checkpoint or the new one, never part of one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from finetune.output_errors import tensor_bytes, writing
from finetune.run.cache_lock import remove_leftovers
from finetune.run.safe_checkpoint import load_checkpoint, refusing_code

TEMP_SUFFIX = ".tmp"  # not .ckpt: nothing that looks for checkpoints takes a half-written one


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go to a temp file beside the target and are renamed, and
    whose loads (resume, `trainer.test(ckpt_path=...)`) use torch's weights-only unpickler unless the
    caller passes `weights_only=False` (trust_checkpoint=true): Lightning's own default is the full
    one, which runs whatever code a checkpoint holds."""

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        fs, local_path = url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            with refusing_code(path):
                return super().load_checkpoint(path, map_location, weights_only=weights_only is not False)
        if not Path(local_path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(local_path, map_location=map_location, trust=weights_only is False, mmap=False)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            # Lightning's errors for storage_options; object stores write whole objects already.
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(local_path)
        # A full disk or a read-only folder is one line naming the file; the previous one stays.
        with writing(target, needed=tensor_bytes(checkpoint)):
            _save_atomically(checkpoint, target)


def _save_atomically(checkpoint: dict[str, Any], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process writes a run's checkpoints, so temp files of this name are from killed saves.
    remove_leftovers(target.parent, f".{target.name}.", TEMP_SUFFIX)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:  # the umask's permissions, as Lightning's own file would get
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself survive a crash of the machine, not only of the process."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
