"""What the processes of tests/test_concurrency.py run (PYTHONPATH=tests): meet at one moment,
build a cache entry, or kill themselves while a checkpoint is being written.

    python tests/concurrency_helpers.py resized ROOT CACHE SHORT_SIDE [READY_DIR N]
    python tests/concurrency_helpers.py hotdog DATA_DIR URL SHA1 [READY_DIR N]
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback


def start_together(folder: Path, processes: int) -> None:
    """Return in every one of `processes` processes at the same moment: each leaves a file in
    `folder`, waits for all of them, then sleeps until just after the next whole second after the
    last one came (all read the same file times, so all wake at the same time, in one second)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{os.getpid()}").touch()
    while len(ready := list(folder.glob("ready-*"))) < processes:
        time.sleep(0.005)
    start = math.floor(max(p.stat().st_mtime for p in ready)) + 1.05
    time.sleep(max(0.0, start - time.time()))


class StartTogether(Callback):
    """Hydra callback: the runs meet just before Hydra names their run dirs (`on_run_start`)."""

    def __init__(self, folder: str, processes: int = 2) -> None:
        self.folder, self.processes = Path(folder), processes

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        start_together(self.folder, self.processes)


class KillDuringSave(L.Callback):
    """At the `nth` checkpoint save, SIGKILL this process as soon as the checkpoint folder changes
    (a file appears, or one changes size, time or inode): the write has started, not finished."""

    def __init__(self, nth: int = 2) -> None:
        self.nth, self.saves = nth, 0

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saves += 1
        if self.saves == self.nth:
            folder = Path(trainer.checkpoint_callback.dirpath)
            threading.Thread(target=_kill_on_change, args=(folder, _snapshot(folder)), daemon=True).start()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    state = {}
    for entry in os.scandir(folder):
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        state[entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return state


def _kill_on_change(folder: Path, before: dict[str, tuple[int, int, int]]) -> None:
    while _snapshot(folder) == before:
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    kind, args = argv[0], argv[1:]
    # Imported before the processes meet: an import of several seconds after it would let one
    # process build the whole entry before the other asks for the lock (a race the test lost).
    from finetune.data.hotdog import fetch_hotdog
    from finetune.data.resized_cache import resized_copy

    if len(args) == 5:  # three arguments, then READY_DIR N
        start_together(Path(args[3]), int(args[4]))
    if kind == "resized":
        print("entry", resized_copy(Path(args[0]), Path(args[1]), int(args[2])), flush=True)
    elif kind == "hotdog":
        print("entry", fetch_hotdog(Path(args[0]), url=args[1], sha1=args[2]), flush=True)
    else:
        raise SystemExit(f"unknown helper {kind}")


if __name__ == "__main__":
    main(sys.argv[1:])
