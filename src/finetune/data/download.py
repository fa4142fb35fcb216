"""Download with a checksum, and extract zips without letting a member escape its folder.

torchvision's helpers check MD5 only and silently rewrite `../` members; the hot-dog archive is
published with a SHA-1, and a hostile member (a name that escapes, a symlink) should be refused,
not rewritten. Downloads hold
the file's lock (`finetune.run.cache_lock`): jobs of a sweep fetching the same file fetch it once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.run.cache_lock import entry_lock, remove_leftovers

TIMEOUT_S = 30


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha1: str | None = None) -> Path:
    """Fetch `url` to `dest` through a temporary file; only a verified file ever lands at `dest`.

    Under `dest`'s lock: a job that waited for another one fetching the same file reuses it when
    its checksum says it is the right one, and parts left by killed downloads are removed.
    """
    with entry_lock(dest):
        if sha1 is not None and dest.is_file() and file_digest(dest, "sha1") == sha1.lower():
            return dest
        remove_leftovers(dest.parent, f".{dest.name}.", ".part")
        return _fetch(url, dest, sha1)


def _fetch(url: str, dest: Path, sha1: str | None) -> Path:
    """The download itself, into a temp name beside `dest` (same file system: the rename is atomic)."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        if sha1 is not None:
            actual = file_digest(tmp, "sha1")
            if actual != sha1.lower():
                raise FinetuneError(
                    f"checksum mismatch for {url}: SHA-1 {actual}, expected {sha1}; "
                    "the download was discarded, retry or check the URL"
                )
        os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise FinetuneError(
            f"could not download {url} ({reason}); download it by hand to {dest} "
            "or run `python -m finetune.cli.prefetch` on a machine with internet"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _member_kind(member: zipfile.ZipInfo) -> str | None:
    """What a member is when it is not a plain file or folder: a symlink (which would point
    anywhere once extracted), a hard link, device or pipe; None for files and folders. The Unix
    file type sits in the top bits of `external_attr` (0 for archives made on Windows: files)."""
    mode = member.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind in (0, stat.S_IFREG, stat.S_IFDIR):
        return None
    names = {stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device",
             stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
    return names.get(kind, f"a special file (mode {oct(kind)})")


def safe_extract_zip(archive: Path, target: Path) -> None:
    """Extract every member under `target`, refusing absolute paths, `..` components, and members
    that are not plain files or folders (symlinks and links: zipfile would write a link's target
    path as the file's bytes, and a tool that honours it would write through it)."""
    target = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            name = member.filename
            resolved = (target / name).resolve()
            if os.path.isabs(name) or ".." in Path(name).parts or not resolved.is_relative_to(target):
                raise FinetuneError(
                    f"refusing to extract {archive}: member {name!r} would land outside {target}"
                )
            kind = _member_kind(member)
            if kind is not None:
                raise FinetuneError(f"refusing to extract {archive}: member {name!r} is {kind}, not a file; "
                                    "only plain files and folders are extracted (check where the archive came from)")
        zf.extractall(target)
