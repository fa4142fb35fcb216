"""One decoder for train, eval, predict and export: `data.draft_decode`, stored in the checkpoint."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train
from finetune.cli.export import check_batch, export
from finetune.cli.predict import predict
from finetune.cli.train import train
from finetune.data import FolderDataModule
from finetune.data.decode import decoder
from finetune.data.folder import largest_side
from finetune.data.image_files import find_files, model_inputs
from finetune.data.preprocessing import decide_for
from finetune.data.resized_cache import resized_copy
from finetune.data.transforms import Preprocessing, eval_transform
from finetune.models.checkpoint import load_classifier

SIDE = 32  # crop and resize size; the photos are 4x that, so draft mode decodes them at 1/4 scale
P = Preprocessing(crop_size=SIDE, resize_size=SIDE)
SMALL = ["model.weights=null", "data.num_workers=0", f"data.image_size={SIDE}", f"data.resize_size={SIDE}",
         "data.batch_size=8", "data.augment=false", "trainer.precision=32-true",
         "callbacks=model_checkpoint", "~logger"]


def photo(path: Path, size: tuple[int, int] = (5 * SIDE, 4 * SIDE), seed: int = 0) -> Path:
    """A noisy colour gradient as a JPEG: fine detail, so a reduced-scale decode shows."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    pixels = (pixels + rng.normal(0, 40, pixels.shape)).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def photo_folder(root: Path, per_class: int = 4) -> Path:
    for s, split in enumerate(("train", "test")):
        for label, cls in enumerate(("a", "b")):
            for i in range(per_class):
                photo(root / split / cls / f"{i}.jpg", seed=100 * s + 10 * label + i)
    return root


def full_decode(path: Path) -> Image.Image:
    """The reference: Pillow's plain open + convert, as torchvision's default loader does."""
    with Image.open(path) as image:
        return image.convert("RGB")


def test_the_switch_changes_pixels_and_off_is_a_full_decode(tmp_path):
    path = str(photo(tmp_path / "p.jpg"))
    drafted = decoder(P)(path)
    full = decoder(Preprocessing(crop_size=SIDE, resize_size=SIDE, draft_decode=False))(path)
    assert drafted.size == (5 * SIDE // 4, SIDE)  # 1/4 scale, short side kept at the resize size
    assert np.array_equal(np.asarray(full), np.asarray(full_decode(Path(path))))
    a, b = eval_transform(P)(drafted), eval_transform(P)(full)
    assert a.shape == b.shape == (3, SIDE, SIDE)
    assert (a - b).abs().max() > 0.05  # the switch matters for what the model sees


@pytest.mark.parametrize("draft", [True, False])
def test_train_eval_predict_and_export_read_the_same_pixels(tmp_path, draft):
    root = photo_folder(tmp_path / "photos", per_class=2)
    dm = FolderDataModule(root=str(root), num_workers=0, image_size=SIDE, resize_size=SIDE,
                          augment=False, draft_decode=draft)
    p = decide_for(dm, Preprocessing())
    assert p.draft_decode is draft
    dm.setup("fit")
    files = find_files(root / "test")
    predicted = torch.stack([model_inputs(files, p)[i][1] for i in range(len(files))])
    tested = torch.stack([dm.datasets["test"][i][0] for i in range(len(files))])
    assert torch.equal(tested, predicted)
    # Training (augment=false: the eval transform) reads through the same decoder.
    train_files = find_files(root / "train")
    train_items = {i: dm.datasets["train"].dataset[i][0] for i in dm.datasets["train"].indices}
    train_predicted = model_inputs(train_files, p)
    for i, image in train_items.items():
        assert torch.equal(image, train_predicted[i][1])
    # Export's parity check on real images, too.
    cfg = compose_train(["ckpt_path=unused", f"check_input={root / 'test'}", "check_batch_size=3"],
                        tmp_path / "export", config_name="export")
    assert torch.equal(check_batch(cfg, p, torch.Generator()), predicted[:3])
    reference = torch.stack([eval_transform(p)(full_decode(f)) for f in files])
    assert torch.equal(predicted, reference) is not draft  # draft differs from a full decode


def predicted_probs(ckpt: Path, images: Path, out: Path) -> torch.Tensor:
    """predict.py's probabilities for the files under `images`, in `find_files` order."""
    predict(compose_train([f"ckpt_path={ckpt}", f"input={images}"], out, config_name="predict"))
    with open(out / "predictions.csv") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    files = find_files(images)
    assert sorted(rows) == sorted(map(str, files))
    return torch.tensor([[float(rows[str(f)][f"prob_{c}"]) for c in "ab"] for f in files])


def with_recorded_choice(ckpt: Path, target: Path, draft: bool | None) -> Path:
    """A copy of `ckpt` whose recorded choice is `draft` (None: no such field, as before it existed)."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    recorded = saved["hyper_parameters"]["preprocessing"]
    recorded.pop("draft_decode")
    if draft is not None:
        recorded["draft_decode"] = draft
    torch.save(saved, target)
    return target


@pytest.mark.slow  # train, then predict and export
def test_the_choice_travels_with_the_checkpoint_and_predict_follows_it(make_cfg, tmp_path):
    root = photo_folder(tmp_path / "photos")
    train(make_cfg(["data=folder", f"data.root={root}", *SMALL, "trainer.max_epochs=1",
                    "data.draft_decode=false"]))
    (ckpt,) = (tmp_path / "checkpoints").glob("epoch_*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["preprocessing"]["draft_decode"] is False
    model = load_classifier(ckpt)
    assert model.preprocessing.draft_decode is False

    images = root / "test"
    files = find_files(images)
    p = model.preprocessing
    with torch.no_grad():
        full = model(torch.stack([eval_transform(p)(full_decode(f)) for f in files])).softmax(-1)
        drafted = model(torch.stack([eval_transform(p)(decoder(P)(str(f))) for f in files])).softmax(-1)
    assert (full - drafted).abs().max() > 1e-4  # so the checks below can tell the two apart
    assert torch.allclose(predicted_probs(ckpt, images, tmp_path / "p-full"), full, atol=2e-6)
    draft_ckpt = with_recorded_choice(ckpt, tmp_path / "draft.ckpt", True)
    assert torch.allclose(predicted_probs(draft_ckpt, images, tmp_path / "p-draft"), drafted, atol=2e-6)
    # Export's parity check runs on the same decoded images and records how they were decoded.
    target = tmp_path / "deploy" / "model.pt"
    info = export(compose_train([f"ckpt_path={ckpt}", "format=torchscript", f"output={target}",
                                 f"check_input={images}"], tmp_path / "export", config_name="export"))
    assert info["parity"]["passed"] and info["parity"]["inputs"] == str(images)
    assert info["preprocessing"]["draft_decode"] is False
    assert info["preprocessing"]["steps"].startswith("decode fully")
    # A checkpoint written before the switch existed was evaluated with draft decoding.
    old = with_recorded_choice(ckpt, tmp_path / "old.ckpt", None)
    assert load_classifier(old).preprocessing.draft_decode is True


def test_eval_follows_the_checkpoint_unless_the_data_config_says_otherwise(tmp_path):
    assert FolderDataModule(root=str(tmp_path), draft_decode=False).preprocessing.draft_decode is False
    recorded = Preprocessing(draft_decode=False)
    assert decide_for(FolderDataModule(root=str(tmp_path)), recorded).draft_decode is False
    assert decide_for(FolderDataModule(root=str(tmp_path), draft_decode=True), recorded).draft_decode is True
    assert decide_for(FolderDataModule(root=str(tmp_path)), Preprocessing()).draft_decode is True


def test_the_shrunk_copy_follows_the_switch(tmp_path):
    root = tmp_path / "src"
    photo(root / "train" / "a" / "0.jpg")
    drafted = resized_copy(root, tmp_path / "cache", short_side=SIDE, draft=True)
    with Image.open(drafted / "train" / "a" / "0.jpg") as image:
        draft_pixels = np.asarray(image.convert("RGB"), dtype=float)
    full = resized_copy(root, tmp_path / "cache", short_side=SIDE, draft=False)
    assert full != drafted
    with Image.open(full / "train" / "a" / "0.jpg") as image:
        full_pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert np.abs(full_pixels - draft_pixels).mean() > 1


def test_widely_varying_sizes_in_the_sample_are_warned_about(tmp_path, caplog):
    mixed = tmp_path / "mixed"
    photo(mixed / "a" / "0.jpg", size=(16, 12))
    photo(mixed / "a" / "1.jpg", size=(100, 80))
    uniform = tmp_path / "uniform"
    photo(uniform / "a" / "0.jpg", size=(100, 80))
    photo(uniform / "a" / "1.jpg", size=(90, 80))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert largest_side(uniform, crop_size=224) == 100
        assert not caplog.records
        assert largest_side(mixed, crop_size=224) == 100
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert str(mixed) in message and "from 16 to 100 px" in message
    assert "upsampled to 224 on the device" in message and "data.resize_on_device" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune"):
        largest_side(mixed, crop_size=160)  # 100 > 160 / 2: the per-image pipeline
    assert "one by one" in caplog.records[0].getMessage()
