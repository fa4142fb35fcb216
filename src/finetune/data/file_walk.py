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
from collections.abc import Iterable, Iterator
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
    linked_files: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, path: str) -> None:
        self.links_skipped += 1
        if len(self.skipped_examples) < 3:
            self.skipped_examples.append(printable(path))


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def iter_files(root: str | os.PathLike, keep=is_image, walk: Walk | None = None, chunk: int = 256,
               ) -> Iterator[tuple[str, os.stat_result | None]]:
    """(path, stat or None) of every non-directory entry under `root` whose name passes `keep`,
    folder by folder (`_folders`), each real file once: a link to a file already listed is
    skipped and counted in `walk.links_skipped`. `chunk`: files stat'ed ahead of the caller (1
    for a caller that stops at the first)."""
    walk = walk if walk is not None else Walk()
    for folder, files in _once_each(_folders(root, keep, walk, chunk), walk):
        for name, entry_stat in files:
            yield os.path.join(folder, name), entry_stat


def _once_each(folders: Iterable[tuple[str, list[tuple[str, os.stat_result | None]]]], walk: Walk,
               ) -> Iterator[tuple[str, list[tuple[str, os.stat_result | None]]]]:
    """`_folders`' output without the files already listed under another name (same device and
    inode: a link to a file, a hard link), each counted in `walk.links_skipped`."""
    seen: set[tuple[int, int]] = set()
    for folder, files in folders:
        kept = []
        for name, entry_stat in files:
            if entry_stat is not None:
                key = (entry_stat.st_dev, entry_stat.st_ino)
                if key in seen:
                    walk.skip(os.path.join(folder, name))
                    continue
                seen.add(key)
            kept.append((name, entry_stat))
        yield folder, kept


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
    links were skipped (loops, duplicates) so a folder never counts an image twice in silence.

    Why it does not use `iter_files`: on a million files its per-file Python (a path joined and
    cut again, a million-entry set of inodes) grew faster than the files did. Here a file costs
    one `stat` and one record, and the inode set is built only when a file could be listed twice
    (a link, or a hard link): then the folder is listed again through `_once_each`.
    """
    walk = Walk()
    root_path = os.fspath(root)
    entries, twice = _records(root_path, _folders(root_path, is_image, walk), walk)
    if twice:  # the rare folder with file links: list it with the inode set, each real file once
        walk = Walk()
        entries, _ = _records(root_path, _once_each(_folders(root_path, is_image, walk), walk), walk)
    if say_links and walk.links_skipped:
        log.warning("%s: skipped %d links to folders or files already listed (loops or duplicates, "
                    "e.g. %s); each image counts once", root, walk.links_skipped,
                    ", ".join(walk.skipped_examples))
    entries.sort()
    return entries


def _records(root_path: str, folders: Iterable[tuple[str, list[tuple[str, os.stat_result | None]]]], walk: Walk,
             ) -> tuple[list[tuple[str, int, int]], bool]:
    """`list_images`'s records of `folders` (from `_folders` under `root_path`) in walk order, and
    whether a file link or hard link was met (then some file may be listed twice)."""
    from finetune.data.progress import Progress

    start = len(root_path.rstrip(os.sep)) + 1
    entries: list[tuple[str, int, int]] = []
    append = entries.append
    twice = False
    with Progress(f"listing image files under {printable(root_path)}") as progress:
        for folder, files in folders:
            prefix = "" if folder == root_path else folder[start:].replace(os.sep, "/") + "/"
            for name, st in files:
                if st is None:
                    append((prefix + name, -1, -1))
                    continue
                append((prefix + name, st.st_size, st.st_mtime_ns))
                if st.st_nlink > 1:
                    twice = True
            progress.advance(len(files))
    return entries, twice or walk.linked_files > 0


def _folders(root: str | os.PathLike, keep, walk: Walk, chunk: int = 4096,
             ) -> Iterator[tuple[str, list[tuple[str, os.stat_result | None]]]]:
    """(folder, [(name, stat or None)]) for the files under `root` whose name passes `keep`: each
    real folder once, its files in name order, its subfolders after them, depth first (a folder of
    more than `chunk` files comes in several parts: a progress step each).

    Hidden folders are not entered. A folder reached through a link is entered unless its real
    folder was already seen (`_enter`). Special files (FIFOs, sockets) are listed, so the checks
    report them as unreadable; an entry that cannot be stat'ed (a dangling link) too. Links to
    files are counted in `walk.linked_files`: they can name a file twice.
    """
    try:
        st = os.stat(root)
    except OSError:
        return
    seen_dirs = {(st.st_dev, st.st_ino)}
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        files: list[tuple[str, os.stat_result | None]] = []
        subfolders = []
        for entry in _sorted_entries(folder):
            try:
                st = entry.stat()  # follows links
            except OSError:
                if keep(entry.name):
                    files.append((entry.name, None))
                continue
            if stat.S_ISDIR(st.st_mode):
                if _enter(entry, st, seen_dirs, walk):
                    subfolders.append(entry.path)
            elif keep(entry.name):
                files.append((entry.name, st))
                walk.linked_files += entry.is_symlink()
                if len(files) == chunk:
                    yield folder, files
                    files = []
        yield folder, files
        stack.extend(reversed(subfolders))


def _sorted_entries(folder: str) -> list[os.DirEntry]:
    """The folder's entries by name; none when it cannot be read."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=_name)
    except OSError:
        return []


def _enter(entry: os.DirEntry, st: os.stat_result, seen_dirs: set, walk: Walk) -> bool:
    """Whether to walk into the subfolder `entry`: not hidden, and its real folder not seen yet
    (else a loop or a second link to it, counted in `walk.links_skipped`). A folder's subfolders
    are claimed when it is read, so a real folder wins over a link to it from deeper down."""
    if entry.name.startswith("."):
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen_dirs:
        walk.skip(entry.path)
        return False
    seen_dirs.add(key)
    return True


def _name(entry: os.DirEntry) -> str:
    return entry.name


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
