"""What the server runs: a checkpoint (PyTorch) or an exported ONNX file (onnxruntime), behind one
small interface: `preprocessing`, `class_names`, `info` and `probabilities(images)`.

Both give softmax(logits / temperature) over the `tta` views, as predict.py does: the checkpoint
through the model's own `predict_step`; the ONNX file has the temperature folded into its head by
export.py, and its `model.json` beside it carries the class names and preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from finetune.data.transforms import Preprocessing
from finetune.errors import FinetuneError
from finetune.models.calibration import check_tta
from finetune.models.checkpoint import load_classifier
from finetune.models.exporters import ONNX_PACKAGES


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointModel:
    def __init__(self, path: str, tta: str | None, device: str = "cpu") -> None:
        self.model = load_classifier(path).to(device)
        self.model.set_tta(tta)
        self.preprocessing, self.class_names = self.model.preprocessing, list(self.model.class_names)
        self.info = {"name": self.model.hparams["name"], "format": "checkpoint",
                     "temperature": self.model.temperature, "tta": self.model.tta}

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.predict_step(images.to(self.model.device), 0).float().cpu()


class OnnxModel:
    def __init__(self, path: str, tta: str | None) -> None:
        onnx, described = Path(path).expanduser(), Path(path).expanduser().with_suffix(".json")
        check_tta(tta)
        if not onnx.is_file() or not described.is_file():
            raise FinetuneError(f"onnx={onnx}: pass onnx=PATH to a .onnx written by export.py, with "
                                f"its .json beside it ({described.name} {'found' if described.is_file() else 'missing'})")
        try:
            import onnxruntime
        except ImportError as e:
            raise FinetuneError(ONNX_PACKAGES) from e
        meta = json.loads(described.read_text())
        self.session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        self.tta, self.class_names = tta, list(meta["class_names"])
        # The graph divides by the plain temperature; TTA-averaged logits need their own.
        self.tta_rescale = 1.0
        if tta is not None and meta.get("temperature", 1.0) != 1.0:
            tta_temperature = (meta.get("tta_temperatures") or {}).get(tta)
            if tta_temperature is None:
                raise FinetuneError(f"tta={tta}: {described.name} has no temperature fitted on {tta}-averaged "
                                    "logits; export again from a checkpoint trained with tta (or serve ckpt_path=, "
                                    "or tta=null)")
            self.tta_rescale = float(meta["temperature"]) / float(tta_temperature)
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.info = {"name": meta.get("architecture"), "format": "onnx",
                     "temperature": meta["temperature"], "tta": tta}

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["logits"], {"images": images.numpy()})[0])

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        logits = self._logits(images)  # already divided by the temperature (folded in at export)
        if self.tta == "hflip":
            logits = (logits + self._logits(images.flip(-1).contiguous())) / 2 * self.tta_rescale
        return logits.float().softmax(dim=-1)


def load_served(ckpt_path: str | None, onnx: str | None, tta: str | None,
                device: str = "cpu") -> CheckpointModel | OnnxModel:
    """The checkpoint at `ckpt_path` or the ONNX file at `onnx` (exactly one of them)."""
    if (ckpt_path is None) == (onnx is None):
        raise FinetuneError("pass ckpt_path=PATH (a .ckpt from train.py) or onnx=PATH (a .onnx from "
                            "export.py format=onnx), one of them")
    return CheckpointModel(ckpt_path, tta, device) if ckpt_path is not None else OnnxModel(onnx, tta)
