"""An on-disk copy of an image tree with every image shrunk to the size training reads.

Decoding a 12-megapixel photo to crop 224 pixels from it wastes most of the decode; paying it once
per data set instead of once per epoch is the cheapest speed-up for folders of large images. The
copy's name holds a digest of the source listing (paths, sizes, mtimes) and the size, so a changed
source or size gets a fresh copy. Every process that uses a copy holds a shared lock on it for its
life; a stale copy (same source, size and decode, older listing) is removed only when no process
holds it, so a job still reading an older copy (a sweep, a job started before the folder changed)
never loses its images. Files keep their names in the copy (a shrunk `x.png` holds JPEG data and
is still `x.png`; Pillow reads the format from the content), so `x.png` and `x.jpg` stay two files.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
from pathlib import Path

from PIL import Image

try:
    import fcntl
except ImportError:  # Windows: stale copies are kept
    fcntl = None
from torch.utils.data import DataLoader, Dataset

from finetune.data.decode import load_rgb
from finetune.data.file_checks import FILE_ERRORS, unreadable_reason
from finetune.data.file_walk import list_images, open_regular
from finetune.data.jpeg import save_jpeg, shrunk
from finetune.data.progress import Progress
from finetune.run.cache_lock import LOCK_SUFFIX, entry_lock, remove_leftovers

log = logging.getLogger("finetune")
VERSION = 4  # bump when the way copies are made changes (2: the shared decoder; 3: names kept; 4: 4:4:4 JPEG)
STAGING_SUFFIX = ".tmp"  # a copy being built: .<name>.<pid>.tmp beside where it will be


_held: dict[str, int] = {}  # copy -> descriptor of its in-use lock, open for the process's life


def cache_path(root: Path, cache_dir: Path, short_side: int, draft: bool = True,
               listing: list[tuple[str, int, int]] | None = None) -> Path:
    """Where the copy of `root` at `short_side` lives; the name changes whenever the source does.

    `<folder>-<digest of its path>-<size>px[-full]-<digest of the listing>`: all but the last part
    name the kind of copy, the last part its version.
    """
    root = root.resolve()
    source = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    key: tuple = (VERSION, short_side, list_images(root) if listing is None else listing)
    kind = f"{root.name}-{source}-{short_side}px"
    if not draft:  # other pixels
        key += ("full-decode",)
        kind += "-full"
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    return cache_dir / f"{kind}-{digest}"


def _in_use_lock(copy: Path) -> Path:
    return copy.parent / f".{copy.name}.in-use{LOCK_SUFFIX}"  # kept: unlinking it would split the lock


def hold(copy: Path) -> None:
    """Mark `copy` as read by this process until it exits or takes another version of the same
    kind (a shared `flock`, released by the OS however the process ends, inherited by forked
    loader workers)."""
    if fcntl is None or str(copy) in _held:
        return
    kind = copy.name.rsplit("-", 1)[0]
    for other in [p for p in _held if Path(p).parent == copy.parent and Path(p).name.rsplit("-", 1)[0] == kind]:
        os.close(_held.pop(other))
    copy.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_in_use_lock(copy), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held[str(copy)] = fd


def remove_stale(target: Path) -> None:
    """Delete the other versions of `target`'s kind of copy that no process holds."""
    if fcntl is None:  # no way to tell whether another process reads them: keep them
        return
    kind = target.name.rsplit("-", 1)[0]
    for stale in target.parent.glob(glob.escape(kind) + "-*"):
        if stale == target or stale.name.rsplit("-", 1)[0] != kind or not stale.is_dir():
            continue
        fd = os.open(_in_use_lock(stale), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("kept the stale resized copy %s: another process is reading it", stale)
            os.close(fd)
            continue
        try:  # nobody can start using it now: a reader takes its lock before looking for it
            shutil.rmtree(stale, ignore_errors=True)
            log.info("removed the stale resized copy %s", stale)
        finally:
            os.close(fd)


def shrink(src: Path, dst: Path, short_side: int, draft: bool = True) -> None:
    """Write `src` with its short side reduced to `short_side` (as `finetune.data.jpeg` shrinks and
    stores every image, the converted chunks' too); smaller images are copied as they are.

    `draft`: decode JPEGs at reduced scale first, as `finetune.data.decode.load_rgb` does.
    """
    with open_regular(src) as f, Image.open(f) as image:  # the header only
        w, h = image.size
        if min(w, h) <= short_side:
            dst.parent.mkdir(parents=True, exist_ok=True)
            f.seek(0)
            with open(dst, "wb") as out:
                shutil.copyfileobj(f, out)
            return
    image = load_rgb(str(src), short_side if draft else None)  # upright, 8-bit RGB
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_jpeg(shrunk(image, short_side), dst)  # under the source's own name: see the module doc


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
                 draft: bool = True, exclude: set[str] | frozenset[str] = frozenset(),
                 listing: list[tuple[str, int, int]] | None = None) -> Path:
    """The tree at `root` with images shrunk to `short_side`: reused if current, else (re)built;
    held by this process until it exits (see `hold`).

    `exclude` (paths relative to `root`) are the files found unreadable: the copy leaves them out.
    They are part of the listing the name is made from, so a copy never misses a file it should hold.
    `listing`: `list_images(root)` when the caller has it.
    """
    root = root.resolve()
    listing = list_images(root) if listing is None else listing
    target = cache_path(root, cache_dir, short_side, draft, listing)
    hold(target)  # before looking: a cleaner that got the lock first has finished removing it
    if target.is_dir():
        return target
    # Jobs of a sweep starting together wait for the one building this copy, then reuse it.
    with entry_lock(target):
        if not target.is_dir():
            _build(root, target, short_side, num_workers, draft,
                   [rel for rel, _, _ in listing if rel not in exclude])
    return target


def _build(root: Path, target: Path, short_side: int, num_workers: int, draft: bool, files: list[str]) -> None:
    """Shrink every image into a staging folder, then rename it to `target`: never a half copy.

    Runs under the target's lock: staging folders still there were left by killed builds.
    """
    cache_dir = target.parent
    remove_leftovers(cache_dir, f".{target.name}.", STAGING_SUFFIX)
    remove_stale(target)
    log.info("caching %d images of %s at short side %d in %s", len(files), root, short_side, target)
    staging = cache_dir / f".{target.name}.{os.getpid()}{STAGING_SUFFIX}"
    staging.mkdir(parents=True)
    try:
        shrink_all = _ShrinkAll(root, staging, files, short_side, draft)
        with Progress("resizing images", total=len(files)) as progress:
            for _ in DataLoader(shrink_all, batch_size=None, num_workers=num_workers):
                progress.advance()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless the build failed
