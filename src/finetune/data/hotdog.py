"""`data=hotdog`: the d2l fine-tuning chapter's hot-dog data set (1,400 + 1,000 images, 2 classes)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from finetune.data.download import download, safe_extract_zip
from finetune.data.folder import FolderDataModule, check_tree
from finetune.errors import FinetuneError
from finetune.run.cache_lock import entry_lock, remove_leftovers

URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
CLASSES = ["hotdog", "not-hotdog"]
log = logging.getLogger("finetune")
STAGING_PREFIX = ".hotdog-"  # temp extraction folders beside the tree


def is_complete(target: Path) -> bool:
    """A tree is only ever moved into place whole, so both splits there means it is complete."""
    return (target / "train").is_dir() and (target / "test").is_dir()


def fetch_hotdog(data_dir: Path, url: str = URL, sha1: str = SHA1) -> Path:
    """Make `data_dir`/hotdog/{train,test} exist: reuse it, or download, verify and extract.

    Under the tree's lock, so jobs of a sweep starting together download and extract it once.
    """
    target = data_dir / "hotdog"
    if is_complete(target):
        return target
    with entry_lock(target):
        if is_complete(target):  # another job built it while this one waited
            return target
        remove_leftovers(data_dir, STAGING_PREFIX)  # from extractions that were killed
        archive = download(url, data_dir / "hotdog.zip", sha1=sha1)  # reused when its SHA-1 matches
        _extract_into_place(archive, target)
    return target


def _extract_into_place(archive: Path, target: Path) -> None:
    """Extract beside the target and move into place, so an interrupted run leaves no half tree."""
    log.info("extracting %s into %s", archive, target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=STAGING_PREFIX))
    try:
        safe_extract_zip(archive, staging)
        extracted = staging / "hotdog"
        if not extracted.is_dir():
            raise FinetuneError(f"{archive} has no top-level hotdog/ folder; delete it and retry")
        if target.exists():  # an incomplete tree, not made here: nobody can be reading it
            shutil.rmtree(target)
        extracted.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class HotdogDataModule(FolderDataModule):
    def __init__(self, root: str, url: str = URL, sha1: str = SHA1, **kwargs) -> None:
        super().__init__(root=str(Path(root).expanduser() / "hotdog"), **kwargs)
        self.data_dir = Path(root).expanduser()
        self.url, self.sha1 = url, sha1

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    def prepare_data(self) -> None:
        fetch_hotdog(self.data_dir, self.url, self.sha1)
        found = check_tree(self.root)
        if found != CLASSES:
            raise FinetuneError(f"{self.root} holds classes {found}, expected {CLASSES}; delete it and retry")
        super().prepare_data()  # the shrunk copy, with data.cache=true
