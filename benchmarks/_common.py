"""Shared by the speed benchmarks: the product's composed config, step timing, the CIFAR copy."""

from __future__ import annotations

import atexit
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def product_config(overrides: list[str], out_dir: Path) -> DictConfig:
    """The config `python train.py OVERRIDES` would run, writing under `out_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = cfg.paths.log_dir = str(out_dir)
        cfg.paths.data_dir = str(out_dir / "data")
    HydraConfig().set_config(cfg)
    return cfg


class StepTimer(L.Callback):
    """Wall time of training steps `warmup`..end (start of the first timed step to end of the last)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.images += len(batch[1])
            self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.images / (self.end - self.start)


def scratch_dir(prefix: str) -> Path:
    """A temp dir removed when the benchmark exits (unpacked data and run dirs are large)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def cifar_jpeg_root() -> Path | None:
    """The CIFAR-10 JPEG copy beside the checkout, unpacked to a temp dir; None when absent."""
    if not CIFAR_TARBALL.exists():
        return None
    target = scratch_dir("cifar10-jpeg-")
    with tarfile.open(CIFAR_TARBALL) as tar:
        tar.extractall(target, filter="data")
    return target / "cifar10"
