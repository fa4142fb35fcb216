"""The data contract (finetune.data.datamodule): every loader is built by `loader(split)` over
`dataset(split)`, a callback replaces a split only through `use_stand_in`, for every source
(streaming's training loader included); and the resized copy and the converted chunks shrink and
store an image the same way (finetune.data.jpeg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from conftest import compose_train
from finetune.cli.optimize import EncodeImages, convert
from finetune.data.folder import FolderDataModule
from finetune.data.preprocessing import decide_for
from finetune.data.resized_cache import shrink
from finetune.data.shapes import ShapesDataModule, draw_shape, write_image_folder
from finetune.data.transforms import Preprocessing

SMALL = ["model.weights=null", "data.image_size=32", "data.resize_size=32", "data.num_workers=0"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A folder of 4 classes x 4 train, 2 test images, converted to LitData chunks."""
    pytest.importorskip("litdata", reason="the streaming extra: pip install -e '.[streaming]'")
    work = tmp_path_factory.mktemp("contract")
    root = write_image_folder(work / "f", {"train": 4, "test": 2}, 40)
    cfg = compose_train(["data=folder", f"data.root={root}", *SMALL], work, config_name="optimize")
    convert(cfg.data, cfg.model.name, cfg.model.weights, str(work / "set"), num_workers=1)
    return work / "set"


def _datamodule(kind: str, converted_dir: Path | None):
    if kind == "streaming":
        from finetune.data.streaming import StreamingDataModule

        dm = StreamingDataModule(str(converted_dir), batch_size=4, num_workers=0)
    else:
        dm = ShapesDataModule(train_size=16, val_size=4, test_size=4, native_size=40, batch_size=4, num_workers=0)
    decide_for(dm, Preprocessing(crop_size=32, resize_size=32))
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("kind", ["shapes", "streaming"])
def test_a_stand_in_is_what_every_loader_serves(kind, request):
    converted_dir = request.getfixturevalue("converted") if kind == "streaming" else None
    dm = _datamodule(kind, converted_dir)
    stand_ins = {split: TensorDataset(torch.randn(len(dm.images(split)), 8), torch.arange(len(dm.images(split))))
                 for split in ("train", "val")}
    dm.use_stand_in(stand_ins.get)
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        assert dm.dataset(split) is stand_ins[split]
        rows = [row for features, _ in loader for row in features]
        assert all(row.dim() == 1 for row in rows), f"{kind}'s {split} loader read the images, not the stand-in"
        expected = stand_ins[split].tensors[0]
        if split == "train":  # shuffled, and a last incomplete batch may be dropped
            assert len(rows) >= len(expected) - dm.batch_size + 1
            assert {tuple(r.tolist()) for r in rows} <= {tuple(r.tolist()) for r in expected}
        else:
            assert torch.equal(torch.stack(rows), expected)
    images, _ = next(iter(dm.test_dataloader()))  # no stand-in for test: its images
    assert images.dim() == 4
    dm.use_stand_in(None)
    images, _ = next(iter(dm.train_dataloader()))
    assert images.dim() == 4


def test_splits_are_read_only_outside_use_stand_in():
    dm = _datamodule("shapes", None)
    with pytest.raises(TypeError):
        dm.datasets["train"] = TensorDataset(torch.zeros(1, 8), torch.zeros(1))  # type: ignore[index]


@pytest.mark.parametrize("draft", [True, False])
def test_the_resized_copy_and_the_converted_chunks_hold_the_same_bytes(tmp_path, draft):
    """One image, shrunk by `data.cache`'s copy and by `python -m finetune.cli.optimize`: the same JPEG."""
    root = tmp_path / "f"
    for split, label in (("train", 0), ("train", 1), ("test", 0), ("test", 1)):
        folder = root / split / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        draw_shape(label, np.random.default_rng(label), 300).resize((300, 220)).save(folder / "a.jpg", quality=97)
    short_side = 64
    dm = FolderDataModule(str(root), draft_decode=draft, num_workers=0)
    decide_for(dm, Preprocessing(crop_size=short_side, resize_size=short_side))
    dataset = dm.make_split("train", None)
    encode = EncodeImages(dataset, short_side)
    for index, (path, _) in enumerate(dataset.samples):
        shrink(Path(path), tmp_path / "copy" / f"{index}.jpg", short_side, draft=draft)
        copied = (tmp_path / "copy" / f"{index}.jpg").read_bytes()
        assert encode(index)["image"] == copied
        with Image.open(tmp_path / "copy" / f"{index}.jpg") as image:
            assert min(image.size) == short_side
