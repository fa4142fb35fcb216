"""An on-disk copy of an image tree with every image shrunk to the size training reads.

Decoding a 12-megapixel photo to crop 224 pixels from it wastes most of the decode; paying it once
per data set instead of once per epoch is the cheapest speed-up for folders of large images. The
copy's name holds a digest of the source listing (paths, sizes, mtimes) and the size, so a changed
source or size gets a fresh copy and the stale one is removed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from finetune.cache_lock import entry_lock, remove_leftovers
from finetune.data.decode import load_rgb
from finetune.data.file_checks import FILE_ERRORS, unreadable_reason
from finetune.data.file_walk import list_images, open_regular

log = logging.getLogger("finetune")
VERSION = 2  # bump when the way copies are made changes (2: the shared decoder: EXIF, 16-bit)
JPEG_QUALITY = 95
STAGING_SUFFIX = ".tmp"  # a copy being built: .<name>.<pid>.tmp beside where it will be


def cache_path(root: Path, cache_dir: Path, short_side: int, draft: bool = True) -> Path:
    """Where the copy of `root` at `short_side` lives; the name changes whenever the source does."""
    root = root.resolve()
    source = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    key: tuple = (VERSION, short_side, list_images(root))
    if not draft:  # other pixels; draft copies keep the names they had before the switch existed
        key += ("full-decode",)
    listing = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    return cache_dir / f"{root.name}-{source}-{short_side}px-{listing}"


def shrink(src: Path, dst: Path, short_side: int, draft: bool = True) -> None:
    """Write `src` with its short side reduced to `short_side` (JPEG); smaller images are copied.

    `draft`: decode JPEGs at reduced scale first, as `finetune.data.decode.load_rgb` does.
    """
    with Image.open(src) as image:  # the header only
        w, h = image.size
    if min(w, h) <= short_side:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst.with_suffix(src.suffix))
        return
    image = load_rgb(str(src), short_side if draft else None)  # upright, 8-bit RGB
    w, h = image.size
    scale = short_side / min(w, h)
    size = (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))
    small = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    small.save(dst.with_suffix(".jpg"), quality=JPEG_QUALITY)


class _ShrinkAll(Dataset):
    """One item per file, so a DataLoader's workers do the shrinking in parallel."""

    def __init__(self, root: Path, target: Path, files: list[str], short_side: int, draft: bool) -> None:
        self.root, self.target, self.files, self.short_side = root, target, files, short_side
        self.draft = draft

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> int:
        try:
            shrink(self.root / self.files[i], self.target / self.files[i], self.short_side, self.draft)
        except FILE_ERRORS as e:  # turned bad since it was checked: the copy goes without it
            log.warning("resized copy: left out %s (%s)", self.root / self.files[i], unreadable_reason(e))
        return i


def resized_copy(root: Path, cache_dir: Path, short_side: int, num_workers: int = 0,
                 draft: bool = True, exclude: set[str] | frozenset[str] = frozenset()) -> Path:
    """The tree at `root` with images shrunk to `short_side`: reused if current, else (re)built.

    `exclude` (paths relative to `root`) are the files found unreadable: the copy leaves them out.
    They are part of the listing the name is made from, so a copy never misses a file it should hold.
    """
    root = root.resolve()
    target = cache_path(root, cache_dir, short_side, draft)
    if target.is_dir():
        return target
    # Jobs of a sweep starting together wait for the one building this copy, then reuse it.
    with entry_lock(target):
        if not target.is_dir():
            _build(root, target, short_side, num_workers, draft, exclude)
    return target


def _build(root: Path, target: Path, short_side: int, num_workers: int, draft: bool,
           exclude: set[str] | frozenset[str]) -> None:
    """Shrink every image into a staging folder, then rename it to `target`: never a half copy.

    Runs under the target's lock: staging folders still there were left by killed builds.
    """
    cache_dir = target.parent
    remove_leftovers(cache_dir, f".{target.name}.", STAGING_SUFFIX)
    prefix = target.name.rsplit("-", 1)[0] + "-"
    for stale in cache_dir.glob(prefix + "*"):
        if stale.is_dir() and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)
    files = [rel for rel, _, _ in list_images(root) if rel not in exclude]
    log.info("caching %d images of %s at short side %d in %s", len(files), root, short_side, target)
    staging = cache_dir / f".{target.name}.{os.getpid()}{STAGING_SUFFIX}"
    staging.mkdir(parents=True)
    try:
        shrink_all = _ShrinkAll(root, staging, files, short_side, draft)
        for _ in DataLoader(shrink_all, batch_size=None, num_workers=num_workers):
            pass
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless the build failed
