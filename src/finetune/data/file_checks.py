"""Which files of a split are readable images: checked before training, remembered, recorded.

Real folders hold truncated JPEGs, HTML pages saved as `.jpg`, zero-byte files from a failed copy
and decompression bombs. Each file is opened and decoded at the smallest scale Pillow's draft mode
allows (a JPEG's entropy-coded data is still read to its end, so truncation shows; the inverse
DCT is 1/64 of the work), in a pool of processes. Results are remembered per file by
(size, mtime), so a second run on an unchanged folder only stats its files. Files that pass here
and still fail later (changed on disk, or a decoder corner case) are caught while loading instead
of killing the epoch (`finetune.data.skipping`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from finetune.data.file_walk import open_regular, paused_gc
from finetune.data.progress import Progress

log = logging.getLogger("finetune")
VERSION = 1  # bump when what a check decides changes: old memos are then ignored
FILE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, UnidentifiedImageError)


def unreadable_reason(exc: BaseException) -> str:
    """A short, one-line reason for a decode failure."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (Pillow cannot identify the format)"
    if isinstance(exc, OSError) and str(exc).startswith("not a regular file"):
        return str(exc).split(":", 1)[0]
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (decompression bomb check)"
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_image(path: str) -> str | None:
    """None if `path` decodes as an image, else the reason it does not.

    Images over Pillow's pixel limit are refused from their header, before any decoding. Only
    regular files are opened, without blocking (a named pipe is a reason, not a hang).
    """
    try:
        with open_regular(path) as f, warnings.catch_warnings():
            if os.fstat(f.fileno()).st_size == 0:
                return "empty file (0 bytes)"
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as image:
                if image.format == "JPEG":
                    image.draft(image.mode, (1, 1))  # the smallest DCT scale
                image.load()
    except FILE_ERRORS as e:
        return unreadable_reason(e)
    return None


def _check_chunk(paths: Sequence[str]) -> list[str | None]:
    return [check_image(p) for p in paths]


def _check_many(paths: list[str], workers: int) -> list[str | None]:
    """`check_image` over `paths`, in `workers` processes when there are enough files to pay."""
    chunk = max(64, min(4096, len(paths) // (max(workers, 1) * 8)))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    reasons: list[str | None] = []
    with Progress("checking image files", total=len(paths)) as progress:
        if workers <= 1 or len(paths) < 512:
            parts = map(_check_chunk, chunks)
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
            parts = pool.map(_check_chunk, chunks)
        try:
            for part in parts:
                reasons += part
                progress.advance(len(part))
        finally:
            if workers > 1 and len(paths) >= 512:
                pool.shutdown()
    return reasons


class FileChecks:
    """Check results for the files under one folder, remembered in `memo_dir` between runs.

    The memo never lives inside the user's data folder; a lost or corrupt memo only costs a
    re-check. It is written to a temp name and renamed, so concurrent runs never see half of one.
    Files new or changed since are appended to a journal beside it (one write, O_APPEND), so adding
    one file to a folder of a million costs one file's check and one line, not a rewrite of the
    memo; the memo is rewritten only when files went away or the journal grew past a quarter of it.

    Beside the memo, a summary holds the answer for the last listing checked, keyed by a digest of
    every (path, size, mtime): an unchanged folder of a million files is answered from it without
    loading the per-file memo (whose million entries cost 6 s here and grew 1.8x per file from
    100k to 1M, each lookup a cache miss). Any added, removed or changed file changes the digest.
    """

    def __init__(self, root: Path, memo_dir: Path | None, workers: int = 1) -> None:
        self.root = Path(root).resolve()
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        self.memo = Path(memo_dir) / f"file-checks-{self.root.name}-{digest}.json" if memo_dir else None
        self.workers = workers

    @property
    def journal(self) -> Path | None:
        return self.memo.with_name(self.memo.name + ".journal") if self.memo else None

    @property
    def summary(self) -> Path | None:
        return self.memo.with_name(self.memo.name + ".summary") if self.memo else None

    def _load_summary(self, digest: str) -> dict[str, str] | None:
        """The remembered answer for the listing with this digest, or None."""
        if self.summary is None:
            return None
        try:
            data = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        if data.get("version") != VERSION or data.get("listing") != digest:
            return None
        return data.get("unreadable")

    def _save_summary(self, digest: str, unreadable: dict[str, str]) -> None:
        if self.summary is not None:
            _write_json(self.summary, {"version": VERSION, "listing": digest, "unreadable": unreadable})

    def _load_memo(self) -> dict[str, list]:
        if self.memo is None or not self.memo.is_file():
            return {}
        try:
            data = json.loads(self.memo.read_text())
        except (OSError, ValueError):
            return {}
        files = data.get("files", {}) if data.get("version") == VERSION else {}
        self._journal_lines = 0
        if files and self.journal.is_file():
            with open(self.journal, encoding="utf-8") as f:
                for line in f:
                    try:
                        path, *entry = json.loads(line)
                    except ValueError:  # a line cut by a crash: that file is checked again
                        continue
                    files[path] = entry
                    self._journal_lines += 1
        self._base_size = len(files) - self._journal_lines
        return files

    def _append_memo(self, entries: dict[str, list]) -> bool:
        """Add `entries` to the journal; False when the memo must be rewritten instead."""
        if self.memo is None or not self.memo.is_file():
            return False
        if self._journal_lines + len(entries) > max(64, self._base_size // 4):
            return False
        text = "".join(json.dumps([path, *entry]) + "\n" for path, entry in entries.items())
        try:
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, text.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError:
            return False
        return True

    def _save_memo(self, entries: dict[str, list]) -> None:
        if self.memo is not None and _write_json(self.memo, {"version": VERSION, "files": entries}):
            self.journal.unlink(missing_ok=True)

    @paused_gc()
    def unreadable(self, paths: Iterable[str], sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, str]:
        """{path: reason} for the files in `paths` that are not readable images.

        `sizes`: (size, mtime_ns) of each path from a listing just taken, so a warm run does not
        stat a million files twice; a negative size (stat failed) is stat'ed again for the reason.
        """
        paths = list(paths)
        digest = listing_digest(paths, sizes)
        if digest is not None and (known := self._load_summary(digest)) is not None:
            log.info("%d image files under %s unchanged since they were last checked (%d unreadable; "
                     "remembered in %s)", len(paths), self.root, len(known), self.summary)
            return known
        self._journal_lines, self._base_size = 0, 0
        memo = self._load_memo()
        stats, todo = {}, []
        for i, path in enumerate(paths):
            try:
                if sizes is not None and sizes[i][0] >= 0:
                    stats[path] = list(sizes[i])
                else:
                    st = os.stat(path)
                    stats[path] = [st.st_size, st.st_mtime_ns]
            except OSError as e:
                stats[path] = None
                memo[path] = [None, None, unreadable_reason(e)]
                continue
            known = memo.get(path)
            if known is None or known[:2] != stats[path]:
                todo.append(path)
        if todo:
            log.info("checking %d image files under %s (%d processes)", len(todo), self.root, self.workers)
            for path, reason in zip(todo, _check_many(todo, self.workers)):
                memo[path] = [*stats[path], reason]
        kept = {p: memo[p] for p in stats if p in memo}
        if len(kept) != len(memo) or (todo and not self._append_memo({p: memo[p] for p in todo})):
            self._save_memo({p: v for p, v in kept.items() if v[0] is not None})
        unreadable = {p: v[2] for p, v in kept.items() if v[2]}
        if digest is not None:
            self._save_summary(digest, unreadable)
        return unreadable


def _write_json(path: Path, data: dict) -> bool:
    """`data` into `path` whole or not at all (a temp name, then renamed); False when it could not:
    a read-only cache dir costs a re-check next time, nothing else."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("could not remember file checks in %s (%s)", path, e)
        return False


def listing_digest(paths: Sequence[str], sizes: Sequence[tuple[int, int]] | None) -> str | None:
    """SHA-256 of every (path, size, mtime_ns) in order, with the checks' VERSION; None without
    sizes or with a file that could not be stat'ed (its reason is looked up, not remembered)."""
    if sizes is None or len(sizes) != len(paths) or any(size < 0 for size, _ in sizes):
        return None
    text = "".join(f"{p}\0{size}\0{mtime}\n" for p, (size, mtime) in zip(paths, sizes))
    return hashlib.sha256(f"{VERSION}\n{text}".encode("utf-8", "surrogateescape")).hexdigest()
