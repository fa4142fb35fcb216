"""A callback for DDP tests, imported by the training processes (tests/ is put on their PYTHONPATH)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


def checksum(module) -> str:
    """Of the parameters only: DDP broadcasts rank 0's buffers before each forward, and BatchNorm
    in training mode then updates each rank's running statistics with its own batch."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class WeightChecksums(L.Callback):
    """After every training epoch each rank writes the checksums of the backbone and head and the
    number of backbone tensors that require grad to OUT/rank<r>.json."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append({
            "epoch": trainer.current_epoch,
            "backbone": checksum(pl_module.backbone),
            "head": checksum(pl_module.head),
            "trainable": sum(p.requires_grad for p in pl_module.backbone.parameters()),
        })
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.epochs))
