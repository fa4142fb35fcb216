"""`data=hotdog`: the d2l fine-tuning chapter's hot-dog data set (1,400 + 1,000 images, 2 classes)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from finetune.data.download import download, file_digest, safe_extract_zip
from finetune.data.folder import FolderDataModule, check_tree
from finetune.errors import FinetuneError

URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
CLASSES = ["hotdog", "not-hotdog"]


def fetch_hotdog(data_dir: Path, url: str = URL, sha1: str = SHA1) -> Path:
    """Make `data_dir`/hotdog/{train,test} exist: reuse it, or download, verify and extract."""
    target = data_dir / "hotdog"
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    archive = data_dir / "hotdog.zip"
    if not archive.exists() or file_digest(archive, "sha1") != sha1:
        download(url, archive, sha1=sha1)
    # Extract beside the target and move into place, so an interrupted run leaves no half tree.
    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=".hotdog-"))
    try:
        safe_extract_zip(archive, staging)
        extracted = staging / "hotdog"
        if not extracted.is_dir():
            raise FinetuneError(f"{archive} has no top-level hotdog/ folder; delete it and retry")
        if target.exists():
            shutil.rmtree(target)
        extracted.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
