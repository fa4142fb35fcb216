"""How many loader worker processes, and whether batches go to pinned memory, when the config does
not say: from the CPUs this process may use and the device it trains on."""

from __future__ import annotations

import os

import lightning as L
import torch


def available_cpus() -> int:
    """CPUs this process may use (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Leave one core to the training process; never more than 8 workers."""
    return max(0, min(8, available_cpus() - 1))


def default_pin_memory() -> bool:
    """Pinned host memory only pays for copies to a CUDA device."""
    return torch.cuda.is_available()


def loader_workers(num_workers: int, given: bool, per_batch_resize: bool, trainer: L.Trainer | None) -> int:
    """`num_workers`, except for tiny sources (resized per batch on the device: `per_batch_resize`)
    trained on the CPU, which load in the main process unless the config `given` a number.

    Their per-image work (~0.3 ms for a 32-pixel JPEG) costs less than a worker process takes
    from compute threads that already use every core (benchmarks/throughput.py).
    """
    if given or not per_batch_resize or trainer is None:
        return num_workers
    return 0 if trainer.strategy.root_device.type == "cpu" else num_workers
