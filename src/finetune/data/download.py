"""Download with a checksum, and extract zips without letting a member escape its folder.

torchvision's helpers check MD5 only and silently rewrite `../` members; the hot-dog archive is
published with a SHA-1, and a hostile member name should be refused, not rewritten.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from finetune.errors import FinetuneError

TIMEOUT_S = 30


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha1: str | None = None) -> Path:
    """Fetch `url` to `dest` through a temporary file; only a verified file ever lands at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
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
            "or run `python -m finetune.prefetch` on a machine with internet"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def safe_extract_zip(archive: Path, target: Path) -> None:
    """Extract every member under `target`, refusing absolute paths and `..` components."""
    target = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            name = member.filename
            resolved = (target / name).resolve()
            if os.path.isabs(name) or ".." in Path(name).parts or not resolved.is_relative_to(target):
                raise FinetuneError(
                    f"refusing to extract {archive}: member {name!r} would land outside {target}"
                )
        zf.extractall(target)
