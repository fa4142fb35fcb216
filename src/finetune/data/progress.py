"""Progress of a long start-up stage (listing, file checks, the resized copy): a bar with the
count and rate on a terminal, a log line every `interval` seconds otherwise (SLURM logs), so a
run on a million files is never silent for minutes."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("finetune")


class Progress:
    """`with Progress("checking image files", total) as p: ... p.advance(n)`; `total=None` counts."""

    def __init__(self, what: str, total: int | None = None, interval: float = 10.0) -> None:
        self.what, self.total, self.interval = what, total, interval
        self.done, self.start, self._last = 0, time.perf_counter(), time.perf_counter()
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
                            TimeRemainingColumn(), transient=True)

    def __enter__(self) -> Progress:  # noqa: PYI034
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total, rate="")
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate():.0f}/s")
        elif now - self._last >= self.interval:
            self._last = now
            self._log()

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def _log(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s (%.0f/s)", self.what, self.done, of, self.rate())

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif time.perf_counter() - self.start >= self.interval:
            self._log()  # the last count, for a stage that took long enough to report on
