"""What a run does with files that are not readable images: leaves them out of the folder, records
them (a warning per split, every one in `skipped.csv`), and keeps an epoch going when one fails
later. Which files those are is decided before training by `finetune.data.file_checks`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from finetune.data.file_checks import FILE_ERRORS, unreadable_reason
from finetune.data.file_walk import iter_files, printable
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")
SHOWN = 3  # paths named in the warning; all of them go to skipped.csv


class SkipReport:
    """Unreadable files of a run: a warning per split and every one of them in `skipped.csv`.

    Nothing is written while nothing is skipped. Rows are appended with one write each
    (O_APPEND, the header with the first), so loader workers and DDP ranks can add files that
    fail while decoding without a lock.
    """

    FIELDS = ("split", "path", "reason")

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None

    def add(self, split: str, skipped: dict[str, str], total: int) -> None:
        """Record `skipped` ({path: reason}) of a split of `total` files and warn once for them."""
        if not skipped:
            return
        self._write([(split, printable(p), r) for p, r in sorted(skipped.items())])
        names = [printable(p) for p in sorted(skipped)]
        shown = ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")
        where = f"; all of them with the reason in {self.path}" if self.path else ""
        log.warning("%s: skipped %d of %d files that are not readable images (%s)%s",
                    split, len(skipped), total, shown, where)

    def _write(self, rows: Iterable[Sequence[str]]) -> None:
        if self.path is None:
            return
        buffer = io.StringIO()
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            rows = [self.FIELDS, *rows]
        csv.writer(buffer).writerows(rows)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, buffer.getvalue().encode())
        finally:
            os.close(fd)

    def rows(self) -> list[dict[str, str]]:
        if self.path is None or not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


class SkippingImageFolder(ImageFolder):
    """An ImageFolder without the files in `skipped` ({path: reason}, found by `FileChecks`).

    A file that still fails to decode (it changed after the check) does not kill the epoch: it is
    recorded in `report` and, for training (`replace=True`), the next readable sample takes its
    place so batches keep their size; for evaluation it is dropped (`None`, removed by
    `collate_readable`) so no image counts twice. Only the loader is guarded: an error in a
    transform is a bug and keeps its traceback.
    """

    def __init__(self, root: str, split: str, skipped: dict[str, str], report: SkipReport,
                 replace: bool = True, files: list[str] | None = None, **kwargs) -> None:
        self._files = files  # the listing, when the caller has it; else the folder is walked
        super().__init__(root, allow_empty=True, **kwargs)
        self._files = None
        self.split, self.report, self.replace = split, report, replace
        # With a shrunk copy the unreadable files are already absent and `skipped` names the source's.
        self.total_files = len({path for path, _ in self.samples} | set(skipped))
        self.samples = [s for s in self.samples if s[0] not in skipped]
        self.imgs, self.targets = self.samples, [s[1] for s in self.samples]
        self.skipped = dict(skipped)

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions=None,
                     is_valid_file=None, allow_empty: bool = False) -> list[tuple[str, int]]:
        """ImageFolder's samples, in its order, from a walk that follows no link loop and lists
        each real file once (`finetune.data.file_walk`)."""
        directory = os.fspath(directory)
        files = self._files
        if files is None:
            files = [path for path, _ in iter_files(directory, keep=lambda name: True)]
        start = len(directory.rstrip(os.sep)) + 1
        samples = []
        for path in files:
            name, _, rest = path[start:].partition(os.sep)
            valid = is_valid_file(path) if is_valid_file else has_file_allowed_extension(path, extensions or ())
            if rest and name in class_to_idx and valid:
                samples.append((path, class_to_idx[name]))
        samples.sort(key=lambda s: (s[1], s[0].rpartition(os.sep)))  # (class, folder, "/", name)
        return samples

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                sample = self.loader(path)
            except FILE_ERRORS as e:
                if path not in self.skipped:
                    self.skipped[path] = unreadable_reason(e)
                    self.report.add(self.split, {path: self.skipped[path]}, self.total_files)
                if not self.replace:
                    return None
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise FinetuneError(f"no file of {self.root} can be read as an image any more; "
                            f"see {self.report.path or 'the log'}")


def collate_readable(batch: list):
    """`default_collate` of the samples that could be read (evaluation drops the others)."""
    readable = [item for item in batch if item is not None]
    if not readable:  # a whole batch that turned unreadable since the check
        raise FinetuneError("every image of an evaluation batch failed to decode; see skipped.csv "
                            "and check the data folder for files changed during the run")
    return default_collate(readable)
