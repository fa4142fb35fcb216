"""The process's RNG states as plain data a weights-only checkpoint may hold.

numpy's state holds an ndarray, which torch's weights-only unpickler refuses (README "Security"):
it is stored as an int64 tensor and turned back on restore. Used by `callbacks.resume_state`
(the main process) and `data.resumable_loader` (each loader worker's states).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def collect(include_cuda: bool = True) -> dict[str, Any]:
    """torch (and CUDA), numpy and Python RNG states; numpy's keys as a tensor."""
    states = _collect_rng_states(include_cuda=include_cuda)
    kind, keys, *rest = states["numpy"]
    return {**states, "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *rest)}


def as_numpy_state(states: dict[str, Any]) -> dict[str, Any]:
    """`collect`'s states with numpy's keys back as the uint32 array numpy wants."""
    states = dict(states)
    kind, keys, *rest = states["numpy"]
    states["numpy"] = (kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest)
    return states


def restore(states: dict[str, Any]) -> None:
    _set_rng_states(as_numpy_state(states))
