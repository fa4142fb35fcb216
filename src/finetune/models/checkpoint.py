"""Rebuild a trained classifier from its checkpoint alone, for eval, predict and export.

The checkpoint's hyperparameters already hold the architecture, class names and preprocessing;
`weights=None` stops the backbone factory from fetching ImageNet weights that the checkpoint's own
state dict replaces anyway, so reloading works offline. Checkpoints are pickles: load your own.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.classifier import ImageClassifier

HINT = "pass ckpt_path=PATH to a .ckpt written by train.py (outputs/<date>/<time>/checkpoints/)"
# What torch.load and the state-dict check raise for a file that is not one of our checkpoints.
_UNREADABLE = (
    pickle.UnpicklingError, EOFError, RuntimeError, KeyError, TypeError, ValueError,
    AttributeError, zipfile.BadZipFile, OSError,
)


def load_classifier(path: str | Path, map_location: str = "cpu") -> ImageClassifier:
    """The ImageClassifier saved at `path`, in eval mode; a missing or unreadable file is a user error."""
    if path is None or str(path) in ("", "None"):
        raise FinetuneError(f"ckpt_path is not set; {HINT}")
    ckpt = Path(str(path)).expanduser()
    if not ckpt.is_file():
        raise FinetuneError(f"checkpoint {ckpt} not found; {HINT}")
    try:
        model = ImageClassifier.load_from_checkpoint(
            ckpt, map_location=map_location, weights_only=False, weights=None
        )
    except _UNREADABLE as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise FinetuneError(f"checkpoint {ckpt} is not a readable finetune checkpoint ({reason}); {HINT}") from e
    return model.eval()
