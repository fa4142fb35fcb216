"""Frozen features stream to disk a batch at a time, and an entry is whole or absent.

A million images through resnet50 are 8 GB of features: extraction must write each batch to the
entry's file as it comes and training must read them memory-mapped, not hold them all in memory.
A run killed while writing must leave nothing a later run accepts (it would train a head on
garbage without a word).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import compose_train
from finetune.cli.train import build
from finetune.data.shapes import write_image_folder
from finetune.finetuning import FeatureCache
from finetune.finetuning.feature_cache import MappedFeatures, extract_features
from test_feature_cache import tiny_run

BATCH = 4  # the eval batch: ~10 batches for the 36-image train split


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 classes of 16-pixel PNGs: 12 train and 4 test images per class."""
    return write_image_folder(tmp_path_factory.mktemp("tiny"), {"train": 12, "test": 4}, size=16)


def _setup(folder: Path, tmp_path: Path):
    cfg = compose_train(tiny_run(folder, tmp_path / "cache", f"data.batch_size={BATCH}"), tmp_path)
    torch.manual_seed(0)  # the same random backbone (model.weights=null) in every process: the same key
    dm, model, trainer = build(cfg)
    trainer.strategy.connect(model)
    dm.setup("fit")
    return dm, model, trainer


def _in_memory(dm, model, trainer) -> torch.Tensor:
    loader = DataLoader(dm.datasets["train"], batch_size=BATCH, shuffle=False)
    return extract_features(model.backbone, loader, trainer, dm).tensors[0]


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds `tensor`'s data (Linux), None if it is anonymous memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def _entry_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def test_features_stream_to_disk_batch_by_batch_and_equal_an_in_memory_extraction(folder, tmp_path):
    dm, model, trainer = _setup(folder, tmp_path)
    cache_dir = tmp_path / "cache"
    on_disk: list[int] = []  # at each backbone call: the bytes of the entry's file being written

    def record(*_) -> None:
        partial = list(cache_dir.glob(".train-*.npy.*.tmp"))
        on_disk.append(partial[0].stat().st_size if len(partial) == 1 else -1)

    hook = model.backbone.register_forward_pre_hook(record)
    result = FeatureCache(model.backbone, trainer, str(cache_dir)).features(dm, "train")
    hook.remove()

    features = result.tensors[0]
    n, row = len(dm.datasets["train"]), features[0].numel() * 4
    batches = -(-n // BATCH)
    assert batches >= 3 and len(on_disk) == batches
    # Before batch k is computed, batches 0..k-1 are already in the file (after its header).
    header = on_disk[1] - BATCH * row
    assert on_disk == [0] + [header + k * BATCH * row for k in range(1, batches)], on_disk

    # Read back memory-mapped from the entry's file, not copied into memory...
    npy = cache_dir / f"{FeatureCache(model.backbone, trainer, str(cache_dir)).path_for(dm, 'train').stem}.npy"
    assert isinstance(result, MappedFeatures) and _mapped_file(features) == str(npy)
    assert npy.stat().st_size == header + n * row
    # ... with the very values a straight in-memory extraction gives, and the labels in order.
    assert torch.equal(features, _in_memory(dm, model, trainer))
    assert result.tensors[1].tolist() == [y for _, y in dm.datasets["train"]]

    again = FeatureCache(model.backbone, trainer, str(cache_dir)).features(dm, "train")
    assert isinstance(again, MappedFeatures) and _mapped_file(again.tensors[0]) == str(npy)
    assert torch.equal(again.tensors[0], features) and torch.equal(again.tensors[1], result.tensors[1])
    # A loader worker under spawn receives the path, not a copy of every feature.
    assert len(pickle.dumps(again)) < features.nbytes / 2
    assert torch.equal(pickle.loads(pickle.dumps(again)).tensors[0], features)


def test_an_extraction_stopped_part_way_leaves_no_entry(folder, tmp_path, caplog):
    dm, model, trainer = _setup(folder, tmp_path)
    cache_dir = tmp_path / "cache"
    calls = []

    def fail_at_the_third_batch(*_) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises part way

    hook = model.backbone.register_forward_pre_hook(fail_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(model.backbone, trainer, str(cache_dir)).features(dm, "train")
    hook.remove()
    assert _entry_files(cache_dir) == []  # no entry, no half-written file left behind

    with caplog.at_level(logging.INFO, logger="finetune"):
        result = FeatureCache(model.backbone, trainer, str(cache_dir)).features(dm, "train")
    assert "computed train features" in caplog.text
    assert torch.equal(result.tensors[0], _in_memory(dm, model, trainer))


CHILD = """
import sys, time
import torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import compose_train
from finetune.finetuning import FeatureCache
from finetune.cli.train import build
from test_feature_cache import tiny_run

tmp = Path({tmp!r})
cfg = compose_train(tiny_run(Path({folder!r}), tmp / "cache", "data.batch_size={batch}"), tmp)
torch.manual_seed(0)
dm, model, trainer = build(cfg)
trainer.strategy.connect(model)
dm.setup("fit")
calls = []

def stop_here(*_):
    calls.append(1)
    if len(calls) == 4:  # three batches written, the entry half done
        print("half", flush=True)
        time.sleep(600)

model.backbone.register_forward_pre_hook(stop_here)
FeatureCache(model.backbone, trainer, str(tmp / "cache")).features(dm, "train")
print("finished", flush=True)
"""


@pytest.mark.slow  # a child process that imports torch and is killed
def test_a_killed_extraction_is_never_read_as_a_cache_entry(folder, tmp_path, caplog):
    script = tmp_path / "extract.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path),
                                                   folder=str(folder), batch=BATCH)))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        lines = iter(child.stdout.readline, "")  # (build prints the config first)
        assert any(line.strip() == "half" for line in lines), "the child finished or died before half way"
        os.kill(child.pid, signal.SIGKILL)  # no finally, no atexit: what the OOM killer or a node loss does
    finally:
        child.kill()
        child.wait()
    cache_dir = tmp_path / "cache"
    left = _entry_files(cache_dir)
    assert len(left) == 1 and left[0].startswith(".train-") and left[0].endswith(".tmp"), left  # half-written

    dm, model, trainer = _setup(folder, tmp_path)
    with caplog.at_level(logging.INFO, logger="finetune"):
        result = FeatureCache(model.backbone, trainer, str(cache_dir)).features(dm, "train")
    assert "left by a run stopped while writing it" in caplog.text and "computed train features" in caplog.text
    assert not any(name.endswith(".tmp") for name in _entry_files(cache_dir))
    assert torch.equal(result.tensors[0], _in_memory(dm, model, trainer))
