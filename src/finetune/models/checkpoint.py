"""Rebuild a trained classifier from its checkpoint alone, for eval, predict and export.

The checkpoint's hyperparameters already hold the architecture, class names and preprocessing;
`weights=None` stops the backbone factory from fetching ImageNet weights that the checkpoint's own
state dict replaces anyway, so reloading works offline. Files are read with torch's weights-only
unpickler (finetune.run.safe_checkpoint): a checkpoint that would run code is refused.

Only "this file is not one of our checkpoints" is a user error. The file is checked on its own
first (`read_checkpoint`: a narrow `try` around `torch.load` and nothing else, then a look at its
keys), and the model is built outside any `try`, so an exception from our own model code keeps its
traceback instead of being reported as a bad file.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.models.classifier import ImageClassifier
from finetune.run.safe_checkpoint import load_checkpoint

HINT = "pass ckpt_path=PATH to a .ckpt written by train.py (outputs/<date>/<time>/checkpoints/)"
# What torch.load raises for a file it cannot unpickle: a damaged archive (RuntimeError from the
# zip reader), a damaged pickle, or a pickle naming classes this environment does not have.
_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, ImportError,
                AttributeError, OSError)
# Written by ImageClassifier.save_hyperparameters / set_preprocessing into every checkpoint.
REQUIRED_HPARAMS = ("name", "num_classes", "preprocessing")
OWN_PREFIXES = ("backbone.", "head.")


def _not_ours(ckpt: Path, why: str) -> FinetuneError:
    return FinetuneError(f"checkpoint {ckpt} is not a readable finetune checkpoint ({why}); {HINT}")


def read_checkpoint(ckpt: Path, trust: bool = False) -> dict[str, Any]:
    """The checkpoint dict at `ckpt`, or a FinetuneError saying why it is not one of ours.

    Lightning writes zip archives (torch.save's format), so a file that is not a complete zip is
    missing its end, or was never a checkpoint; the tensors are memory-mapped, not read, so this
    check costs milliseconds however big the file.
    """
    if not zipfile.is_zipfile(ckpt):
        raise _not_ours(ckpt, "not a complete torch.save archive: truncated, or not a checkpoint")
    try:
        checkpoint = load_checkpoint(ckpt, trust=trust)  # a file that would run code: refused, one line
    except _LOAD_ERRORS as e:
        raise _not_ours(ckpt, " ".join(str(e).split())[:200] or type(e).__name__) from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise _not_ours(ckpt, "no Lightning state_dict: a plain state dict or another kind of file")
    hparams = checkpoint.get(ImageClassifier.CHECKPOINT_HYPER_PARAMS_KEY)
    missing = [k for k in REQUIRED_HPARAMS if not isinstance(hparams, dict) or k not in hparams]
    if missing:
        raise _not_ours(ckpt, f"a Lightning checkpoint of another module: no hyperparameters {', '.join(missing)}")
    foreign = [k for k in checkpoint["state_dict"] if not k.startswith(OWN_PREFIXES)]
    if foreign or not checkpoint["state_dict"]:
        raise _not_ours(ckpt, f"weights of another module ({', '.join(foreign[:3]) or 'none'})")
    return checkpoint


def load_classifier(path: str | Path, map_location: str = "cpu", trust: bool = False) -> ImageClassifier:
    """The ImageClassifier saved at `path`, in eval mode; a missing or unreadable file is a user error.
    `trust` (trust_checkpoint=true): the full unpickler, for an old checkpoint of your own."""
    if path is None or str(path) in ("", "None"):
        raise FinetuneError(f"ckpt_path is not set; {HINT}")
    ckpt = Path(str(path)).expanduser()
    if not ckpt.is_file():
        raise FinetuneError(f"checkpoint {ckpt} not found; {HINT}")
    read_checkpoint(ckpt, trust)  # the check only: Lightning reads the file again to build the model
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location=map_location, weights_only=not trust,
                                                 weights=None)
    return model.eval()
