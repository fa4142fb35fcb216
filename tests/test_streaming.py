"""LitData streaming: `python -m finetune.cli.optimize` converts any source, `data=streaming` trains from
the chunks in a local folder or on an S3 API (moto's server on 127.0.0.1), under DDP and resumed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litdata", reason="the streaming extra: pip install -e '.[streaming]'")
import boto3
import torch
from PIL import Image

from conftest import ROOT, compose_train, run_cli
from fake_data import make_cifar10, make_hotdog_tree, patch_cifar10
from finetune.cli.optimize import convert, source_splits
from finetune.cli.train import build, train
from finetune.data.preprocessing import decide_for
from finetune.data.shapes import write_image_folder
from finetune.data.streaming import StreamingDataModule, StreamingSplit
from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError

SMALL = ["model.weights=null", "data.image_size=32", "data.resize_size=32", "data.num_workers=0"]
TRAIN = [*SMALL, "data.batch_size=8", "trainer.max_epochs=1", "trainer.precision=32-true", "logger=csv",
         "callbacks.rich_progress_bar=null", "callbacks.prediction_grid=null", "callbacks.top_losses=null",
         "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
JPEG_TOLERANCE = 5.0  # mean absolute difference in 0-255 levels after one JPEG q95 4:4:4 round trip
# of a noisy image (about 3); two different images of the set differ by 40 or more
BUCKET = "datasets"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _convert(overrides: list[str], output: str | Path, work: Path) -> dict:
    """`python -m finetune.cli.optimize OVERRIDES output=...`, in this process (one worker: in order)."""
    cfg = compose_train(overrides, work, config_name="optimize")
    return convert(cfg.data, cfg.model.name, cfg.model.weights, str(output), num_workers=1)


def _streaming(input_dir: str | Path, *overrides: str) -> list[str]:
    return ["data=streaming", f"data.input_dir={input_dir}", *TRAIN, *overrides]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 classes of 40-pixel PNGs (shrunk to 32 when converted): 10 train, 3 test images each."""
    return write_image_folder(tmp_path_factory.mktemp("src"), {"train": 10, "test": 3}, size=40)


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("converted")
    _convert(["data=folder", f"data.root={folder}", *SMALL], work / "set", work)
    return work / "set"


@pytest.fixture(scope="module")
def s3_server():
    """An S3 API (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch, s3_server) -> str:
    """The AWS variables pointing at the loopback server, with a fresh bucket; yields the endpoint."""
    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3 = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=BUCKET)
    return s3_server


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _shrunk(image: Image.Image, short_side: int) -> Image.Image:
    w, h = image.size
    if min(w, h) <= short_side:
        return image
    scale = short_side / min(w, h)
    return image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)


SOURCES = {
    "folder": lambda work: ["data=folder", f"data.root={write_image_folder(work / 'f', {'train': 4, 'test': 2}, 40)}"],
    "shapes": lambda work: ["data=shapes", "data.train_size=12", "data.val_size=4", "data.test_size=4",
                            "data.native_size=40"],
    "hotdog": lambda work: ["data=hotdog", f"data.root={make_hotdog_tree(work / 'h', per_class=4).parent}"],
    "cifar10": lambda work: ["data=cifar10", f"data.root={work / 'c'}", "data.download=false"],
}


@pytest.mark.parametrize("kind", SOURCES)
def test_conversion_keeps_every_split_class_label_and_pixel(kind, tmp_path, monkeypatch):
    if kind == "cifar10":
        patch_cifar10(monkeypatch, make_cifar10(tmp_path / "c", per_batch=4))
    overrides = [*SOURCES[kind](tmp_path), *SMALL]
    meta = _convert(overrides, tmp_path / "set", tmp_path)

    source = build(compose_train([*overrides, "logger=csv"], tmp_path / "run"))[0]
    source.prepare_data()
    splits = source_splits(source)
    dm = StreamingDataModule(str(tmp_path / "set"))
    assert dm.classes == meta["classes"] == source.classes
    assert meta["splits"] == {split: len(dataset) for split, dataset in splits.items()}
    assert dm.source_size() == source.source_size()
    for split, dataset in splits.items():
        stored = StreamingSplit(str(tmp_path / "set"), split, meta["splits"][split], None, None, "")
        assert len(stored) == len(dataset) > 0
        for i in range(len(dataset)):  # one conversion worker keeps the source's order
            image, label = stored[i]
            want_image, want_label = dataset[i]
            assert label == want_label, (split, i)
            want = _shrunk(want_image, 32)
            assert image.size == want.size, (split, i, image.size, want.size)
            assert np.abs(_pixels(image) - _pixels(want)).mean() < JPEG_TOLERANCE, (split, i)


def test_streaming_adopts_the_sources_transforms(converted, folder, tmp_path):
    dm_source = build(compose_train(["data=folder", f"data.root={folder}", *TRAIN], tmp_path / "a"))[0]
    # No size given at training: 32 pixels is what the conversion recorded (the model's own is 224).
    bare = ["data=streaming", f"data.input_dir={converted}", "model.weights=null", "logger=csv"]
    dm = build(compose_train(bare, tmp_path / "b"))[0]
    assert dm.classes == dm_source.classes
    assert dm.preprocessing == dm_source.preprocessing
    # Explicit data.* values apply on top of the stored ones, as on the source.
    dm2 = build(compose_train(_streaming(converted, "data.augment=false"), tmp_path / "c"))[0]
    assert dm2.preprocessing.augment is False and dm2.preprocessing.crop_size == 32


@pytest.mark.slow
def test_training_from_s3_gives_the_metrics_of_the_local_folder(converted, folder, tmp_path, aws_env):
    uri = f"s3://{BUCKET}/shapes-set"
    _convert(["data=folder", f"data.root={folder}", *SMALL], uri, tmp_path / "convert")
    local = train(compose_train(_streaming(converted), tmp_path / "local"))
    remote = train(compose_train(_streaming(uri), tmp_path / "s3"))
    keys = [k for k in local if k.split("/")[0] in ("val", "test")]
    assert "test/acc" in keys and "val/loss" in keys
    assert {k: remote[k] for k in keys} == {k: local[k] for k in keys}
    assert local["test/images"] == 12 and local["val/images"] == 4  # every image once
    assert list((tmp_path / "s3" / "data" / "streaming_cache").rglob("chunk-*.bin"))  # chunks came over S3


def test_a_missing_bucket_or_data_set_is_one_line_naming_the_uri(aws_env, tmp_path):
    with pytest.raises(FinetuneError, match=r"s3://no-such-bucket/set.*does not exist"):
        StreamingDataModule("s3://no-such-bucket/set").prepare_data()
    with pytest.raises(FinetuneError, match=rf"s3://{BUCKET}/never-converted.*finetune.cli.optimize"):
        StreamingDataModule(f"s3://{BUCKET}/never-converted").prepare_data()
    with pytest.raises(FinetuneError, match=rf"{tmp_path}.*finetune.cli.optimize"):
        StreamingDataModule(str(tmp_path)).prepare_data()


@pytest.mark.slow
def test_an_unreachable_endpoint_is_one_error_line_naming_the_uri_and_the_fix(tmp_path):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result = run_cli("train.py", "data=streaming", f"data.input_dir=s3://{BUCKET}/set", "model.weights=null",
                     cwd=tmp_path, env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x",
                                        "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"},
                     timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach") and f"s3://{BUCKET}/set" in last and "AWS_ENDPOINT_URL" in last
    assert "Traceback" not in result.stderr


def _digest(image: Image.Image) -> torch.Tensor:
    """A sample's identity: its pixels' hash (picklable, for loader workers)."""
    return torch.tensor(int(hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:12], 16))


def _train_loader(converted: Path, workers: int):
    dm = StreamingDataModule(str(converted), batch_size=6, num_workers=workers, seed=3)
    decide_for(dm, Preprocessing(crop_size=32, resize_size=32))
    dm.setup("fit")
    dm.datasets["train"].transform = _digest
    return dm.train_dataloader()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_sees_every_remaining_sample_once(converted, workers):
    alone = [x for images, _ in _train_loader(converted, workers) for x in images.tolist()]
    assert len(alone) == len(set(alone)) == 36  # 36 train images (4 more are val), batches of 6

    loader = _train_loader(converted, workers)
    iterator, seen = iter(loader), []
    for _ in range(2):
        seen += next(iterator)[0].tolist()
    state = loader.state_dict()
    del iterator  # killed mid-epoch
    resumed = _train_loader(converted, workers)
    resumed.load_state_dict(state)
    rest = [x for images, _ in resumed for x in images.tolist()]
    assert seen + rest == alone  # the remaining samples, each once, in the order the run had
    again = [x for images, _ in resumed for x in images.tolist()]  # the next epoch: a new order
    assert sorted(again) == sorted(alone) and again != alone


@pytest.mark.slow
def test_the_frozen_feature_cache_keys_on_the_streaming_data(converted, tmp_path):
    cache = tmp_path / "features"
    run = _streaming(converted, "finetune=frozen", "data.augment=false",
                     f"finetune.callback.cache_dir={cache}")
    first = train(compose_train(run, tmp_path / "one"))
    entries = sorted(p.name.split("-")[0] for p in cache.glob("*.pt"))
    assert entries == ["train", "val"]
    train_entry = torch.load(next(cache.glob("train-*.pt")), weights_only=True)
    assert len(train_entry["labels"]) == 36  # the whole split, not a shard
    second = train(compose_train(run, tmp_path / "two"))  # from the cache: the same run
    assert second["test/acc"] == first["test/acc"] and second["val/loss"] == first["val/loss"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_counts_each_val_and_test_image_once(tmp_path):
    # 33 test images do not split evenly over 2 ranks; a repeated one would make it 34.
    shapes = ["data=shapes", "data.train_size=32", "data.val_size=17", "data.test_size=33", "data.native_size=32"]
    _convert([*shapes, *SMALL], tmp_path / "set", tmp_path / "convert")
    result = run_cli("train.py", "trainer=ddp_cpu", *_streaming(tmp_path / "set"),
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/images"] == 17 and metrics["test/images"] == 33


def _resume_run(run_dir: Path, data: Path, *extra: str) -> subprocess.Popen:
    """`python train.py` from streaming data as tests/test_resume.py runs it: deterministic, a
    mid-epoch last.ckpt every 3 steps (8 steps per epoch)."""
    args = [sys.executable, str(ROOT / "train.py"), *_streaming(data), "model.name=timm:test_resnet",
            "model.head_dropout=0.5", "trainer.max_epochs=2", "trainer.deterministic=true",
            "callbacks.last_checkpoint.every_n_train_steps=3", "data.augment=false", f"hydra.run.dir={run_dir}",
            *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "stdout.log", "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=log,
                            stderr=subprocess.STDOUT)


def _finished(process: subprocess.Popen, run_dir: Path) -> dict[str, float]:
    assert process.wait(timeout=300) == 0, (run_dir / "stdout.log").read_text()[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_from_streaming_data_to_the_same_metrics(tmp_path):
    """The same metrics bit for bit show the resumed run trained on the batches the killed one had
    not, in its order, and then whole epochs (LitData alone left every epoch after a resumed one
    empty under Lightning). Augmentation off: this checks the loader's position, not the crops."""
    shapes = ["data=shapes", "data.train_size=64", "data.val_size=16", "data.test_size=16", "data.native_size=32"]
    _convert([*shapes, *SMALL], tmp_path / "set", tmp_path / "convert")
    alone = _finished(_resume_run(tmp_path / "alone", tmp_path / "set"), tmp_path / "alone")

    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    process = _resume_run(run_dir, tmp_path / "set")
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    assert process.wait() == -signal.SIGKILL, (run_dir / "stdout.log").read_text()[-3000:]
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] % 8 != 0  # mid-epoch
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # LitData's loader state

    resumed = _finished(_resume_run(run_dir, tmp_path / "set", f"ckpt_path={last}", "resume=never"), run_dir)
    for key in ("test/acc", "test/loss", "val/loss", "val/acc", "last_epoch/train/loss_epoch"):
        assert resumed[key] == alone[key], (key, resumed, alone)


DAMAGED_INDEX = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "not an index": lambda data: b'{"format": 1}',
    "binary": lambda data: b"\x00\xff" * 16,
}


@pytest.mark.parametrize("damage", DAMAGED_INDEX)
def test_a_damaged_index_is_one_line_naming_it_and_the_rebuild_command(damage, converted, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(converted, copy)
    index = copy / "train" / "index.json"
    index.write_bytes(DAMAGED_INDEX[damage](index.read_bytes()))
    with pytest.raises(FinetuneError) as info:
        train(compose_train(_streaming(copy, "test=false"), tmp_path / "run"))
    message = str(info.value)
    assert "\n" not in message and f"{index} is damaged" in message
    assert f"python -m finetune.cli.optimize data=<source> output={copy}" in message
