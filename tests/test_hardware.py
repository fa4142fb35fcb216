"""Precision, memory format and compile chosen for the machine; accuracy must not suffer."""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image
from torch import nn

from finetune import hardware
from finetune.cli.train import train
from finetune.errors import FinetuneError
from finetune.models import ImageClassifier
from finetune.runtime import resolve_speed_settings


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolve_precision("auto", "cpu")[0] == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolve_precision("auto", "cpu")[0] == "32-true"
    assert hardware.resolve_precision(None, "cpu")[0] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert hardware.resolve_precision("auto", "gpu")[0] == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert hardware.resolve_precision("auto", "auto")[0] == "16-mixed"
    assert hardware.resolve_precision("32-true", "gpu") == ("32-true", "set explicitly")


def kernel_bf16_flags() -> bool | None:
    """What `lscpu` would list: the Linux kernel's CPU flags, read here independently of the code."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


@pytest.mark.skipif(kernel_bf16_flags() is None, reason="no x86 /proc/cpuinfo flags on this machine")
def test_bf16_detection_agrees_with_the_kernel_and_with_torch():
    """The real detection on this machine, from both sources: the kernel's flags and, where torch
    still has them, its private probes (which read CPUID themselves)."""
    expected = kernel_bf16_flags()
    assert hardware.cpu_bf16_support() == (expected, "/proc/cpuinfo")
    assert hardware.resolve_precision("auto", "cpu")[0] == ("bf16-mixed" if expected else "32-true")
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(p) for p in probes):
        assert any(p() for p in probes) == expected


def _drop_torch_probes(monkeypatch) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)


@pytest.mark.skipif(kernel_bf16_flags() is None, reason="no x86 /proc/cpuinfo flags on this machine")
def test_without_torchs_private_probes_bf16_is_still_detected(monkeypatch, caplog):
    _drop_torch_probes(monkeypatch)
    expected = kernel_bf16_flags()
    assert hardware.cpu_has_fast_bf16() is expected
    assert hardware.resolve_precision("auto", "cpu")[0] == ("bf16-mixed" if expected else "32-true")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_torchs_probes_answer_where_there_is_no_flag_list(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)  # macOS, Windows
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert hardware.cpu_bf16_support() == (True, "torch.cpu")


def test_when_nothing_can_tell_auto_warns_and_uses_fp32(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)
    _drop_torch_probes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert hardware.resolve_precision("auto", "cpu") == ("32-true", "could not detect native bf16 on this CPU")
    (record,) = [r for r in caplog.records if "cannot tell whether this CPU has native bf16" in r.getMessage()]
    assert record.levelno == logging.WARNING and "_is_avx512_bf16_supported" in record.getMessage()


def test_cpu_flags_reads_the_x86_and_the_arm_spelling(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU part\t: 0xd40\n")
    assert hardware.cpu_flags(x86) == {"fpu", "avx512f", "avx512_bf16", "amx_tile"}
    assert hardware.cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert hardware.cpu_flags(tmp_path / "missing") is None


def test_unknown_precision_is_one_line():
    with pytest.raises(FinetuneError, match="trainer.precision=fp8"):
        hardware.resolve_precision("fp8", "cpu")


def test_channels_last_for_convolutional_backbones_only():
    model = ImageClassifier(name="resnet18", weights=None, num_classes=3)
    assert model.channels_last and model.hparams.channels_last is True
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    off = ImageClassifier(name="resnet18", weights=None, num_classes=3, channels_last=False)
    assert not off.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    patch_embedding_only = nn.Sequential(nn.Conv2d(3, 8, 16, 16), nn.Flatten(), nn.Linear(8, 2))
    assert not hardware.is_convolutional(patch_embedding_only)


def test_compile_where_unusable_is_a_warning_and_recorded_off(monkeypatch, caplog):
    monkeypatch.setattr("finetune.models.classifier.compile_problem", lambda device: "no C++ compiler")
    model = ImageClassifier(name="resnet18", weights=None, num_classes=3, compile=True)
    assert model.hparams.compile is False
    assert "model.compile=true ignored: no C++ compiler" in caplog.text
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_resolved_values_are_a_record_and_the_saved_run_config_stays_as_composed(make_cfg, tmp_path):
    """Config flows one way: what `auto` became is returned (for the Trainer and the hparams), and
    neither `cfg` nor the run dir's .hydra/config.yaml is rewritten."""
    cfg = make_cfg(["model.weights=null", "trainer.precision=auto"])
    saved = tmp_path / "run" / ".hydra" / "config.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text("composed: true\n")
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig().set_config(cfg)
    model = ImageClassifier(name="resnet18", weights=None, num_classes=4)
    speed = resolve_speed_settings(cfg, model)
    expected = hardware.resolve_precision("auto", "cpu")[0]
    assert (speed.precision, speed.channels_last, speed.compile) == (expected, True, False)
    assert speed.trainer_kwargs() == {"precision": expected}
    assert speed.resolved() == {"trainer.precision": expected, "model.channels_last": True, "model.compile": False}
    assert cfg.trainer.precision == "auto" and cfg.model.channels_last is None
    assert saved.read_text() == "composed: true\n"


# Minor page faults while a 64 MiB block is allocated, written and freed five times, before and
# after (libc's malloc directly: torch's own small allocations in between would make the count
# depend on how the heap happens to be fragmented).
FAULTS_SCRIPT = """
import ctypes, resource
from finetune.hardware import reuse_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults(size=64 << 20):
    libc.free(ctypes.memset(libc.malloc(size), 1, size))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        libc.free(ctypes.memset(libc.malloc(size), 1, size))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
print(before, reuse_freed_memory(), faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_stops_page_faulting_big_buffers():
    """Fresh interpreter: the setting lasts for the process."""
    before, took_effect, after = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    assert took_effect == "True"
    assert int(before) > 0 and int(after) * 10 < int(before), (before, after)


def test_reuse_freed_memory_follows_the_config(make_cfg, monkeypatch):
    calls = []
    monkeypatch.setattr("finetune.runtime.reuse_freed_memory", lambda: calls.append(1) or True)
    resolve_speed_settings(make_cfg(["model.weights=null"]))
    assert calls == [1]
    resolve_speed_settings(make_cfg(["model.weights=null", "reuse_freed_memory=false"]))
    assert calls == [1]


def write_stripes(root, per_split: dict[str, int], size: int = 32, seed: int = 0):
    """Four classes of noisy stripes (horizontal, vertical, two diagonals): learnable in a few epochs."""
    directions = {"horizontal": (0, 1), "vertical": (1, 0), "diagonal": (1, 1), "antidiagonal": (1, -1)}
    yy, xx = np.mgrid[0:size, 0:size]
    for s, (split, n) in enumerate(per_split.items()):
        for label, (name, (dx, dy)) in enumerate(directions.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            rng = np.random.default_rng([seed, s, label])
            for i in range(n):
                period, phase = rng.uniform(4, 8), rng.uniform(0, 2 * np.pi)
                wave = np.sin(2 * np.pi * (dx * xx + dy * yy) / period + phase)[..., None]
                a = rng.integers(0, 256, 3)
                b = (a + rng.integers(90, 166, 3)) % 256  # always a visible contrast
                pixels = (a + (b - a) * (wave + 1) / 2 + rng.normal(0, 10, (size, size, 3))).clip(0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


@pytest.mark.slow
def test_auto_precision_is_as_accurate_as_fp32(make_cfg, tmp_path):
    """Both runs learn the task to ~99%, so a precision that hurt training would show."""
    if hardware.resolve_precision("auto", "cpu")[0] == "32-true":
        pytest.skip("no native bf16 on this CPU: auto is 32-true, so this would compare fp32 with fp32")
    root = write_stripes(tmp_path / "stripes", {"train": 120, "test": 100})
    results = {}
    for precision in ("32-true", "auto"):
        cfg = make_cfg([
            "data=folder", f"data.root={root}", "data.image_size=32", "data.resize_size=32",
            "data.augment=false", "data.num_workers=0", "data.batch_size=32", "model.weights=null",
            "model.optimizer.lr=2e-3", "trainer.max_epochs=4",
            "model.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,_partial_:true,T_max:4}",
            f"trainer.precision={precision}", "logger=csv", "callbacks=none",
            "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        ])
        results[precision] = (train(cfg)["test/acc"], cfg.trainer.precision)
    (fp32, _), (auto, resolved) = results["32-true"], results["auto"]
    assert resolved == hardware.resolve_precision("auto", "cpu")[0]
    assert fp32 > 0.95, results  # the task was learnt, so the comparison means something
    assert abs(auto - fp32) <= 0.01, results
