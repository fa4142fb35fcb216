"""The validation images taken off train, stored with the run and reused when it resumes.

Without a `val/` folder, validation is a seeded fraction of the training listing. Drawn again on
resume, a listing that changed in between (a file added, removed, or turned unreadable) shifts
every index: most of the new validation images were trained on, and `val/acc`, the best
checkpoint and the temperature are then measured on training data. So the split is a record
(`SplitRecord`), saved in every checkpoint (the data module's `state_dict`) and in the run dir
(`val_split.json`), and a resumed fit takes it from its checkpoint:

- file sources name each validation image by its path under the split's folder: files that are
  gone are dropped from validation, files new to the listing train, and no file moves between
  the two, whatever changed;
- sources read by index (CIFAR-10's arrays, a converted streaming set) store the indices with a
  digest of the listing; a resume whose listing differs is refused in one line, since the same
  indices would now point at other images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from finetune.errors import FinetuneError
from finetune.run.safe_checkpoint import load_checkpoint

log = logging.getLogger("finetune")
VERSION = 1
KEY = "val_split"  # in the data module's state_dict, hence in every checkpoint


def listing_names(dataset: Dataset) -> list[str] | None:
    """Each image's path under its split folder, in index order; None for sources read by index."""
    samples = getattr(dataset, "samples", None)
    root = getattr(dataset, "root", None)
    if samples is None or root is None:
        return None
    prefix = os.path.join(os.fspath(root), "")
    return [path[len(prefix):].replace(os.sep, "/") if path.startswith(prefix)  # the listing's own paths
            else Path(os.path.relpath(path, root)).as_posix() for path, _ in samples]


def listing_digest(dataset: Dataset, names: Sequence[str] | None) -> str:
    """SHA-256 of what identifies the listing: the names, else the source's own fingerprint (or
    its length and labels)."""
    if names is not None:
        text = "\n".join(names)
    elif hasattr(dataset, "fingerprint"):
        text = repr(dataset.fingerprint())
    else:
        text = repr((type(dataset).__name__, len(dataset), list(getattr(dataset, "targets", []) or [])))
    # surrogateescape: file names that are not UTF-8 (finetune.data.file_walk) hash as their bytes.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def draw(dataset: Dataset, val_fraction: float, seed: int) -> tuple[list[int], list[int], dict[str, Any]]:
    """(train indices, val indices, the record) for a new split: a seeded permutation, val first."""
    n = len(dataset)
    n_val = max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    names = listing_names(dataset)
    record = {"version": VERSION, "seed": seed, "val_fraction": val_fraction, "files": n,
              "listing_sha256": listing_digest(dataset, names)}
    val = order[:n_val]
    if names is not None:
        record["val"] = [names[i] for i in val]
    else:
        record["val_indices"] = val
    return order[n_val:], val, record


def reuse(dataset: Dataset, record: dict[str, Any], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices) of the stored split over the listing as it is now; train in the
    seeded permutation's order, so an unchanged listing gives the first run's exact Subset."""
    for key, value in (("val_fraction", val_fraction), ("seed", seed)):
        if record.get(key) != value:
            raise FinetuneError(
                f"data.{key}={value} differs from the {record.get(key)} this run split its validation images "
                f"off train with; a new split would validate on images it trained on: resume with "
                f"data.{key}={record.get(key)}, or start a new run (resume=never)")
    names = listing_names(dataset)
    if "val" in record:
        val = _by_name(names or [], record)
    else:
        val = _by_index(dataset, names, record)
    held = set(val)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return [i for i in order if i not in held], val


def _by_index(dataset: Dataset, names: list[str] | None, record: dict[str, Any]) -> list[int]:
    if listing_digest(dataset, names) != record["listing_sha256"] or max(record["val_indices"]) >= len(dataset):
        raise FinetuneError(
            f"the training data changed since this run split its validation images off it ({record['files']} "
            f"images then, {len(dataset)} now): the stored indices would point at other images, some already "
            "trained on; resume with the data as it was, or start a new run (resume=never)")
    return list(record["val_indices"])


def _by_name(names: list[str], record: dict[str, Any]) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    val = [index[name] for name in record["val"] if name in index]
    gone = len(record["val"]) - len(val)
    if gone:
        log.warning("%d of the %d validation files stored with this run are gone or unreadable; validating "
                    "on the other %d", gone, len(record["val"]), len(val))
    if listing_digest(None, names) != record["listing_sha256"]:
        log.info("the training listing changed since the validation split was made (%d files then, %d now): "
                 "validation keeps its stored files, every other file trains", record["files"], len(names))
    return val


def stored_in_checkpoint(ckpt_path: str | os.PathLike | None, key: str) -> dict[str, Any] | None:
    """The split record saved in `ckpt_path` under the data module's state key `key`, if any."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    checkpoint = load_checkpoint(ckpt_path)
    return (checkpoint.get(key) or {}).get(KEY)


def write(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """`val_split.json` in the run dir, for people: written to a temp name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


class SplitKeeper:
    """A data module's validation split off train: drawn once from `seed`, or taken from the
    checkpoint a fit resumes (`resume_from`), in every checkpoint through the data module's
    `state_dict`, and written for people to `split_file` by the fitting rank zero."""

    def __init__(self, val_fraction: float, seed: int, split_file: str | None = None) -> None:
        self.val_fraction, self.seed, self.split_file = val_fraction, seed, split_file
        self.record: dict[str, Any] | None = None  # the split in use
        self._stored: dict[str, Any] | None = None  # the split to reuse
        self._resumed_from: str | None = None

    def take(self, train: Dataset, train_eval: Dataset, write_file: bool) -> tuple[Subset, Subset]:
        """(train less val, val seen through `train_eval`, the same images as `train` through
        another transform); `write_file`: this process writes `split_file`."""
        stored = self._stored
        if stored is None and self._resumed_from:
            log.warning("%s holds no validation split (written before splits were stored): it is drawn again "
                        "from data.seed; if train's files changed since, validation may hold images already "
                        "trained on", self._resumed_from)
        if stored is None:
            train_idx, val_idx, self.record = draw(train, self.val_fraction, self.seed)
        else:
            train_idx, val_idx = reuse(train, stored, self.val_fraction, self.seed)
            self.record = stored
        if self.split_file and write_file:
            write(self.split_file, self.record)
        return Subset(train, train_idx), Subset(train_eval, val_idx)

    def resume_from(self, ckpt_path: str | os.PathLike, state_key: str) -> None:
        """Reuse the split stored in `ckpt_path` under the data module's state key `state_key`."""
        self._resumed_from = str(ckpt_path)
        self._stored = stored_in_checkpoint(ckpt_path, state_key)

    def state_dict(self) -> dict[str, Any]:
        return {KEY: self.record} if self.record is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any], set_up: bool) -> None:
        """Before set-up (`set_up` False): the split to reuse. After it (Lightning restores a
        checkpoint once the data is set up): the split in use must be that one."""
        stored = state_dict.get(KEY)
        if stored is None:
            return
        if not set_up:
            self._stored = stored
        elif stored != self.record:
            raise RuntimeError("the validation split in use is not the one stored in the checkpoint being restored")
