"""Resized copies (`data.cache=true`): building one never deletes a copy another process is
reading, and two source files never collapse into one file of the copy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.resized_cache import resized_copy

# A process that reads a copy: it holds it until its stdin closes.
READER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from finetune.data.resized_cache import resized_copy
    print(resized_copy(Path(sys.argv[1]), Path(sys.argv[2]), 40, draft=sys.argv[3] == "draft"), flush=True)
    sys.stdin.read()
""")


def _photo(path: Path, color: tuple[int, int, int], fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 90), color).save(path, fmt)


def _source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for i in range(4):
        _photo(root / "train" / "a" / f"{i}.jpg", (10 * i, 0, 0))
        _photo(root / "train" / "b" / f"{i}.jpg", (0, 10 * i, 0))
    return root


def _reader(root: Path, cache: Path, draft: bool) -> tuple[subprocess.Popen, Path]:
    reader = subprocess.Popen([sys.executable, "-c", READER, str(root), str(cache), "draft" if draft else "full"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return reader, Path(reader.stdout.readline().strip())


def test_building_a_copy_never_deletes_one_another_process_reads(tmp_path):
    root, cache = _source(tmp_path), tmp_path / "cache"
    reader, held = _reader(root, cache, draft=True)
    try:
        assert held.is_dir()
        other = resized_copy(root, cache, 40, draft=False)  # a sweep over data.draft_decode
        assert other != held and held.is_dir() and other.is_dir()
        _photo(root / "train" / "a" / "new.jpg", (200, 0, 0))  # the folder changed: a new listing
        changed = resized_copy(root, cache, 40, draft=True)
        assert changed != held and held.is_dir() and len(list(held.rglob("*.jpg"))) == 8
    finally:
        reader.communicate("", timeout=60)
    # Once nobody holds it, the next build of that kind clears the stale copy away (this process
    # let go of `changed` when it took `latest`).
    _photo(root / "train" / "b" / "new.jpg", (0, 200, 0))
    latest = resized_copy(root, cache, 40, draft=True)
    assert not held.exists() and not changed.exists() and latest.is_dir()
    assert other.is_dir()  # a copy of another kind (full decode) is not stale


def test_files_that_differ_only_in_suffix_stay_distinct_in_the_copy(tmp_path):
    root = _source(tmp_path)
    _photo(root / "train" / "a" / "x.jpg", (255, 0, 0))
    _photo(root / "train" / "a" / "x.png", (0, 0, 255))
    copy = resized_copy(root, tmp_path / "cache", 40)
    colors = {}
    for name in ("x.jpg", "x.png"):
        with Image.open(copy / "train" / "a" / name) as im:
            assert min(im.size) == 40
            colors[name] = np.asarray(im.convert("RGB"), dtype=float).mean(axis=(0, 1))
    assert colors["x.jpg"][0] > 200 and colors["x.png"][2] > 200, colors
    assert len([p for p in copy.rglob("*") if p.is_file()]) == 10
