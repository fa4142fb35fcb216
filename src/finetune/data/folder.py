"""`data=folder`: any ImageFolder tree with train/ and test/ (and val/ if present).

The tree is checked up front so that a typo in a path or a stray empty folder is reported in one
line before any model is built.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.data.datamodule import ImageDataModule
from finetune.data.decode import decoder, load_rgb  # noqa: F401  (load_rgb: its former home)
from finetune.data.file_checks import FILE_ERRORS, FileChecks
from finetune.data.file_walk import iter_files, list_images, open_regular
from finetune.data.resized_cache import resized_copy
from finetune.data.skipping import SkippingImageFolder
from finetune.data.transforms import Preprocessing, upsample_on_device
from finetune.data.workers import available_cpus
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")
LAYOUT = "expected DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (val/ optional)"


def _has_image(folder: Path) -> bool:
    return any(path.lower().endswith(IMG_EXTENSIONS) for path, _ in iter_files(folder, chunk=1))


def scan_classes(split_dir: Path) -> list[str]:
    """Class names of one split folder; every class folder must hold at least one image."""
    if not split_dir.is_dir():
        raise FinetuneError(f"missing folder {split_dir}; {LAYOUT}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FinetuneError(f"{split_dir} has no class subfolders; {LAYOUT}")
    for name in classes:
        if not _has_image(split_dir / name):
            raise FinetuneError(
                f"class folder {split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
    return classes


def check_tree(root: Path) -> list[str]:
    """Validate an ImageFolder tree and return its class names."""
    if not root.is_dir():
        raise FinetuneError(f"data.root={root} is not a folder; {LAYOUT}")
    classes = scan_classes(root / "train")
    if len(classes) < 2:
        raise FinetuneError(
            f"{root / 'train'} has one class folder ({classes[0]}); a classifier needs at least two "
            "classes: add a folder of images for each other class"
        )
    for split in ("val", "test"):
        if split == "val" and not (root / "val").exists():
            continue
        other = scan_classes(root / split)
        if other != classes:
            only_train = sorted(set(classes) - set(other)) or "-"
            only_other = sorted(set(other) - set(classes)) or "-"
            raise FinetuneError(
                f"class folders differ between {root / 'train'} and {root / split}: "
                f"only in train: {only_train}; only in {split}: {only_other}; "
                "make both hold the same class folders"
            )
    return classes


def sample_sides(root: Path, samples: int = 16) -> list[int]:
    """The longest side of each of the first few files of each class folder (headers only)."""
    sides = []
    for class_dir in sorted(e.path for e in os.scandir(root) if e.is_dir()):
        names = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMG_EXTENSIONS))
        for name in names[: max(1, samples // 4)]:
            try:
                with open_regular(os.path.join(class_dir, name)) as f, Image.open(f) as image:
                    sides.append(max(image.size))
            except FILE_ERRORS:  # reported with the split's other unreadable files
                continue
        if len(sides) >= samples:
            break
    return sides


def largest_side(root: Path, samples: int = 16, crop_size: int | None = None) -> int | None:
    """The longest image side among the first few files of each class folder (headers only).

    The input pipeline is chosen from this one number (upsampling on the device for sources at
    most half `crop_size`), so a sample whose sizes vary widely is said out loud.
    """
    sides = sample_sides(root, samples)
    if not sides:
        return None
    low, high = min(sides), max(sides)
    if high > 2 * low:
        if crop_size is not None and upsample_on_device(high, crop_size):
            chosen = (f"images are cropped at {high} px and upsampled to {crop_size} on the device, "
                      "so larger images outside the sample lose detail")
        else:
            chosen = "images are resized one by one on the CPU, which is slow for tiny images"
        log.warning(
            "%s: image sides in a sample of %d files range from %d to %d px; the input pipeline is "
            "chosen from the largest: %s; set data.resize_on_device=true|false to choose it yourself",
            root, len(sides), low, high, chosen,
        )
    return high


class FolderDataModule(ImageDataModule):
    """Images from `root`/{train,val,test}/<class>/; val is split off train when absent.

    `cache=True` trains from a copy shrunk to the resize size under `cache_dir` (built once,
    rebuilt when the source changes); without it JPEGs are still decoded at reduced size, unless
    `draft_decode=False` (None: the model's recorded choice, True for a new run).
    """

    def __init__(self, root: str, cache: bool = False, cache_dir: str | None = None,
                 draft_decode: bool | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.overrides["draft_decode"] = draft_decode
        self.preprocessing = self.preprocessing.override(draft_decode=draft_decode)
        self.root = Path(root).expanduser()
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root.parent / ".cache"
        self._image_root: Path | None = None
        self._unreadable: dict[str, str] | None = None
        self._listing: list[tuple[str, int, int]] | None = None

    @cached_property
    def classes(self) -> list[str]:
        return check_tree(self.root)

    def source_size(self) -> int | None:
        if not hasattr(self, "_source_size"):
            self._source_size = largest_side(self.root / "train", crop_size=self.preprocessing.crop_size)
        return self._source_size

    def prepare_data(self) -> None:
        self.image_root()

    def image_root(self) -> Path:
        """`root`, or its shrunk copy when caching pays (images larger than the resize size)."""
        if self._image_root is None:
            self._image_root = self.root
            p = self.preprocessing
            short = max(p.resize_size, p.crop_size)
            if self.cache and (self.source_size() or 0) > short:
                bad = {Path(path).relative_to(self.root).as_posix() for path in self.unreadable()}
                self._image_root = resized_copy(self.root, self.cache_dir, short, self.num_workers,
                                                draft=p.draft_decode, exclude=bad, listing=self.listing())
        return self._image_root

    def listing(self) -> list[tuple[str, int, int]]:
        """(relative path, size, mtime_ns) of every image under `root`: listed once per run, each
        real file once however many links lead to it (the links skipped are said in the log)."""
        if self._listing is None:
            self._listing = list_images(self.root, say_links=True)
        return self._listing

    def unreadable(self) -> dict[str, str]:
        """{path: reason} for the image files under `root` that do not decode (checked in parallel
        once per run, remembered between runs in `cache_dir`, never written into `root`)."""
        if self._unreadable is None:
            base = os.path.join(self.root, "")
            files = [base + rel for rel, _, _ in self.listing()]
            sizes = [(size, mtime) for _, size, mtime in self.listing()]
            self._unreadable = FileChecks(self.root, self.cache_dir, available_cpus()).unreadable(files, sizes)
        return self._unreadable

    def use_preprocessing(self, p: Preprocessing) -> None:
        self._image_root = None  # the cache is keyed by the resize size
        super().use_preprocessing(p)

    def make_split(self, split: str, transform) -> Dataset | None:
        folder = self.image_root() / split
        if split == "val" and not folder.exists():
            return None
        prefix = str(self.root / split) + os.sep
        skipped = {path: why for path, why in self.unreadable().items() if path.startswith(prefix)}
        files = None
        if folder == self.root / split:  # the source itself: its files are listed already
            base, under = os.path.join(self.root, ""), f"{split}/"
            files = [base + rel for rel, _, _ in self.listing() if rel.startswith(under)]
        return SkippingImageFolder(str(folder), split=split, skipped=skipped, report=self.skip_report,
                                   replace=split == "train", transform=transform, files=files,
                                   loader=decoder(self.preprocessing))
