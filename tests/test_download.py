"""The hot-dog download path against a local server: checksum, atomicity, safe extraction."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from pathlib import Path

import pytest

from finetune.data.download import safe_extract_zip
from finetune.data.hotdog import HotdogDataModule, fetch_hotdog
from finetune.data.shapes import write_image_folder
from finetune.errors import FinetuneError


def make_hotdog_zip(path: Path, tmp: Path, evil_member: str | None = None) -> str:
    """A zip laid out like d2l's hotdog.zip; returns its SHA-1."""
    tree = tmp / "tree"
    write_image_folder(tree, {"train": 3, "test": 2}, size=16)
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for name, cls in (("circle", "hotdog"), ("square", "not-hotdog")):
                for f in sorted((tree / split / name).iterdir()):
                    zf.write(f, f"hotdog/{split}/{cls}/{f.name}")
        if evil_member:
            zf.writestr(evil_member, b"pwned")
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(http_server, tmp_path):
    www, base = http_server
    sha1 = make_hotdog_zip(www / "hotdog.zip", tmp_path)
    data_dir = tmp_path / "data"
    dm = HotdogDataModule(root=str(data_dir), url=f"{base}/hotdog.zip", sha1=sha1, num_workers=0,
                          image_size=16, resize_size=16)
    dm.prepare_data()
    assert sorted(p.name for p in (data_dir / "hotdog" / "train").iterdir()) == ["hotdog", "not-hotdog"]
    assert len(list((data_dir / "hotdog" / "test" / "hotdog").iterdir())) == 2
    dm.setup()
    assert len(dm.datasets["test"]) == 4
    image, label = dm.datasets["test"][0]
    assert tuple(image.shape) == (3, 16, 16) and label == 0

    # Present now: a second prepare reuses it even with the server gone.
    (www / "hotdog.zip").unlink()
    fetch_hotdog(data_dir, url=f"{base}/hotdog.zip", sha1=sha1)


def test_wrong_checksum_is_an_error_and_leaves_nothing(http_server, tmp_path):
    www, base = http_server
    make_hotdog_zip(www / "hotdog.zip", tmp_path)
    data_dir = tmp_path / "data"
    with pytest.raises(FinetuneError, match="checksum mismatch"):
        fetch_hotdog(data_dir, url=f"{base}/hotdog.zip", sha1="0" * 40)
    assert [p for p in data_dir.iterdir() if not p.name.endswith(".lock")] == []  # lock files stay


def test_member_escaping_the_folder_is_refused(http_server, tmp_path):
    www, base = http_server
    sha1 = make_hotdog_zip(www / "hotdog.zip", tmp_path, evil_member="hotdog/../../escaped.txt")
    data_dir = tmp_path / "data"
    with pytest.raises(FinetuneError, match="outside"):
        fetch_hotdog(data_dir, url=f"{base}/hotdog.zip", sha1=sha1)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (data_dir / "hotdog").exists()


def test_unreachable_server_names_the_url_and_the_fix(tmp_path):
    with pytest.raises(FinetuneError, match="could not download http://127.0.0.1:9/hotdog.zip"):
        fetch_hotdog(tmp_path, url="http://127.0.0.1:9/hotdog.zip")
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # lock files stay


def _special_member(name: str, file_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (file_type | 0o777) << 16  # how Info-ZIP stores a Unix file type
    return info


SPECIAL = {
    "symlink to an absolute path": (stat.S_IFLNK, b"/etc/passwd"),
    "symlink up the tree": (stat.S_IFLNK, b"../../../../outside"),
    "symlink inside the folder": (stat.S_IFLNK, b"../hotdog/1.png"),
    "named pipe": (stat.S_IFIFO, b""),
    "character device": (stat.S_IFCHR, b""),
}


@pytest.mark.parametrize("kind", SPECIAL)
def test_a_member_that_is_a_link_or_special_file_is_refused_in_one_line(kind, tmp_path):
    """zipfile would write a symlink member as a file holding the link's target path; a tool that
    honours the mode would create a link that later writes go through. Both are refused."""
    archive = tmp_path / "hotdog.zip"
    make_hotdog_zip(archive, tmp_path)
    file_type, content = SPECIAL[kind]
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(_special_member("hotdog/train/hotdog/evil.png", file_type), content)
    target = tmp_path / "out"
    with pytest.raises(FinetuneError) as info:
        safe_extract_zip(archive, target)
    message = str(info.value)
    assert "\n" not in message and "evil.png" in message and str(archive) in message and "not a file" in message
    assert not target.exists() or not any(target.rglob("*"))
