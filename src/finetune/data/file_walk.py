"""Walking a data folder and opening its files, safely: no loops, no blocking opens, any file name.

Data folders come from everywhere: a symlink to a parent (a loop that `os.walk(followlinks=True)`
follows until the path is too long, listing the same images dozens of times), a named pipe or a
device among the images (an `open` that blocks forever), file names in Latin-1 from old archives
(not UTF-8; Python hands them over as `str` with surrogate escapes, which UTF-8 writers refuse).

- `walk_files` visits each real directory and lists each real file once (by device and inode),
  however many links lead to it, and counts the links it skipped.
- `open_regular` opens without blocking and refuses anything that is not a regular file, so a
  FIFO is an unreadable file with a reason, not a hang.
- `printable` turns a name into text any UTF-8 file or terminal takes, recoverably (`unprintable`).
- `paused_gc` keeps Python's cyclic collector out of the bulk work on a million file names.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger("finetune")

_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def not_regular_reason(mode: int) -> str:
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special file')})"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`open(path, "rb")` that never blocks: a FIFO, socket or device raises OSError instead.

    O_NONBLOCK makes opening a FIFO with no writer return at once; fstat on the open descriptor
    (not a stat before the open, which a swap could beat) decides.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{not_regular_reason(mode)}: {printable(os.fspath(path))}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@dataclass
class Walk:
    """What `walk_files` found: (path, stat or None when stat failed) for each file, plus the links
    it did not follow because they led to a directory or file it had already seen."""

    files: list[tuple[str, os.stat_result | None]] = field(default_factory=list)
    links_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, path: str) -> None:
        self.links_skipped += 1
        if len(self.skipped_examples) < 3:
            self.skipped_examples.append(printable(path))


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def iter_files(root: str | os.PathLike, keep=is_image, walk: Walk | None = None,
               ) -> Iterator[tuple[str, os.stat_result | None]]:
    """(path, stat or None) of every non-directory entry under `root` whose name passes `keep`,
    depth first in name order, each real file once.

    Hidden directories are not entered. Directories reached through links are followed unless
    their real directory was already visited (a loop, or a second link to the same folder); a
    link to a file already listed is skipped too. Both count in `walk.links_skipped`. Special
    files (FIFOs, sockets) are listed, so the checks report them as unreadable.
    """
    walk = walk if walk is not None else Walk()
    seen_files: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
    except OSError:
        return
    seen_dirs = {(st.st_dev, st.st_ino)}
    for path, entry_stat in _entries(os.fspath(root), seen_dirs, walk):
        if not keep(os.path.basename(path)):
            continue
        if entry_stat is not None:
            key = (entry_stat.st_dev, entry_stat.st_ino)
            if key in seen_files:
                walk.skip(path)
                continue
            seen_files.add(key)
        yield path, entry_stat


def walk_files(root: str | os.PathLike, keep=is_image) -> Walk:
    """`iter_files` collected, with the count of links skipped."""
    walk = Walk()
    walk.files = list(iter_files(root, keep, walk))
    return walk


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off while a listing, memo or split of N files is built.

    Why: the collector runs after every few hundred new containers, and each run of its oldest
    generation walks every object alive, including the hundreds of thousands torch's import leaves.
    Building N (path, size, mtime) records set off collections in proportion to N, each over the
    whole heap: the warm file check cost 5.3 us a file at 100k files and 1.7 at 10k (1.9 and 1.5
    with the collector paused). Those records hold no reference cycles, so pausing leaves nothing
    uncollected; the state before is restored, so nesting is harmless.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@paused_gc()
def list_images(root: str | os.PathLike, say_links: bool = False) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every image under `root`, sorted; (-1, -1) for an entry
    that cannot be stat'ed (a dangling link: the checks report it). `say_links`: log how many
    links were skipped (loops, duplicates) so a folder never counts an image twice in silence."""
    from finetune.data.progress import Progress

    walk = Walk()
    start = len(os.fspath(root).rstrip(os.sep)) + 1
    entries = []
    with Progress(f"listing image files under {printable(os.fspath(root))}") as progress:
        for path, st in iter_files(root, is_image, walk):
            rel = path[start:].replace(os.sep, "/")
            entries.append((rel, st.st_size, st.st_mtime_ns) if st is not None else (rel, -1, -1))
            progress.advance()
    if say_links and walk.links_skipped:
        log.warning("%s: skipped %d links to folders or files already listed (loops or duplicates, "
                    "e.g. %s); each image counts once", root, walk.links_skipped,
                    ", ".join(walk.skipped_examples))
    entries.sort()
    return entries


def _entries(folder: str, seen_dirs: set, walk: Walk) -> Iterator[tuple[str, os.stat_result | None]]:
    """(path, stat) of the non-directories under `folder`, depth first in sorted order."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat()  # follows links
        except OSError:
            yield entry.path, None  # a dangling link: the checks say why it cannot be read
            continue
        if not stat.S_ISDIR(st.st_mode):
            yield entry.path, st
            continue
        if entry.name.startswith("."):
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            walk.skip(entry.path)
            continue
        seen_dirs.add(key)
        yield from _entries(entry.path, seen_dirs, walk)


def printable(path: str) -> str:
    """`path` as valid UTF-8 text: bytes of the name that are not UTF-8 (a Latin-1 `é` is byte
    0xE9) become `\\xe9`, and, in such names and any holding a backslash, a backslash becomes
    `\\\\`, so `unprintable` gives back the exact name. Other names are unchanged."""
    if os.name != "posix":
        return path
    try:
        path.encode("utf-8")
        if "\\" not in path:
            return path
    except UnicodeEncodeError:
        pass
    return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unprintable(text: str) -> str:
    """The file name `printable` wrote as `text` (what to pass to `open`)."""
    if os.name != "posix" or "\\" not in text:
        return text
    return os.fsdecode(codecs.escape_decode(text.encode("utf-8"))[0])
